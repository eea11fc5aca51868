#!/usr/bin/env bash
# Set up .venv once (idempotent), then run edge-runtime.
#   ./launch.sh                 main job: speak samples/sample.txt into out/sample.wav
#   ./launch.sh test [ARGS]     python -m pytest -q tests [ARGS] (builds the CosyVoice2 reference venv once)
#   ./launch.sh doctor          hardware, chosen profile, installed backends
#   ./launch.sh serve [ARGS]    HTTP server
#   ./launch.sh ARGS...         edge-runtime ARGS...
# TORCH_SPEC replaces the torch requirement, e.g. for a CUDA 12.8 or a CPU-only build:
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" ./launch.sh
# PYTHON picks the interpreter that creates .venv (default python3, needs >= 3.10).
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
STAMP="$VENV/.edge_runtime_installed"

if [ ! -x "$VENV/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$VENV" || {
        echo "error: could not create $VENV (on Debian/Ubuntu: apt-get install python3-venv)" >&2; exit 1; }
fi

# Reinstall only when the package definition changed since the last successful install.
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ setup.py -nt "$STAMP" ]; then
    # torch first and pinned: an unpinned torch pulled in by a dependency can be a multi-GB CUDA build.
    # TORCH_SPEC is split into words on purpose so it can carry pip options (--index-url ...).
    # Install output goes to stderr so stdout carries only the command's own (e.g. doctor --json).
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install ${TORCH_SPEC:-torch==2.13.0} >&2
    "$VENV/bin/python" -m pip install -e '.[dev,server,deepspeed,cosyvoice,vibevoice,ray]' >&2
    touch "$STAMP"
fi

export PATH="$PWD/$VENV/bin:$PATH"
case "${1-}" in
    "")
        mkdir -p out
        exec edge-runtime say --text-file samples/sample.txt -o out/sample.wav ;;
    test)
        shift
        # Debian's chromium + chromedriver for the web page test (tests/test_web_page.py); a no-op when present
        bash scripts/install_browser.sh >&2
        # The CosyVoice2 reference the parity tests compare against: a scratch venv (.cosyvoice_ref/),
        # built once (about 40 s) and again when its script changes; a failed build stops here.
        if [ ! -f .cosyvoice_ref/.built ] || [ scripts/cosyvoice_reference.sh -nt .cosyvoice_ref/.built ]; then
            bash scripts/cosyvoice_reference.sh >&2
            touch .cosyvoice_ref/.built
        fi
        exec python -m pytest -q tests "$@" ;;
    *)
        exec edge-runtime "$@" ;;
esac
