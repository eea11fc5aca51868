#!/usr/bin/env bash
# Install the headless browser the web page test drives (tests/test_web_page.py): Debian's chromium
# and its chromedriver. Idempotent: does nothing when both are already on PATH. Needs root (or
# passwordless sudo) for apt-get; without either it says so and exits 0, and the test skips with
# that reason. The selenium Python package comes from the dev extra (pyproject.toml).
set -euo pipefail

find_browser() {
    for name in chromium chromium-browser google-chrome; do
        command -v "$name" >/dev/null 2>&1 && return 0
    done
    return 1
}

if find_browser && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: no apt-get here; install chromium and chromedriver yourself" >&2
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    echo "install_browser: not root and no passwordless sudo; run: apt-get install -y chromium chromium-driver" >&2
    exit 0
fi
echo "install_browser: installing chromium and chromium-driver (apt-get)" >&2
export DEBIAN_FRONTEND=noninteractive
if ! "${SUDO[@]}" apt-get install -y --no-install-recommends chromium chromium-driver >&2; then
    "${SUDO[@]}" apt-get update >&2 || true
    "${SUDO[@]}" apt-get install -y --no-install-recommends chromium chromium-driver >&2 || {
        echo "install_browser: apt-get could not install chromium; the web page test will skip" >&2
        exit 0
    }
fi
