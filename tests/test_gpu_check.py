"""scripts/gpu_check.sh: valid bash, a usage error without its argument, and exit 2 with a clear
message (and no output folder) where CUDA is not available."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_bash_syntax():
    res = subprocess.run([BASH, "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr


def test_usage_error_without_an_output_folder():
    res = _run()
    assert res.returncode == 64 and "usage" in res.stderr


def test_without_cuda_exits_2_before_doing_anything(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the script would run its checks")
    out = tmp_path / "gpu_out"
    res = _run(str(out), GPU_CHECK_PYTHON=sys.executable)  # this interpreter: no launch.sh install
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "no CUDA GPU" in res.stderr and "torch.cuda.is_available() is False" in res.stderr
    assert "nothing was run" in res.stderr
    assert not out.exists()  # no step ran, nothing was written
