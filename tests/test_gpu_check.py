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


def _summary_code() -> str:
    """The Python that writes summary.md/summary.json (a heredoc in the script), to run on fake steps."""
    text = SCRIPT.read_text()
    start = text.index("<<'PYEOF'\n") + len("<<'PYEOF'\n")
    return text[start:text.index("\nPYEOF\n", start)]


def test_summary_marks_failed_timed_out_and_skipped_steps(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir(), out.mkdir()
    (work / "steps.tsv").write_text("pytest\t0\t30\t110\tpython -m pytest -m gpu tests\n"
                                    "offload_stack\t1\t5\t75\tpython scripts/bench_offload.py\n"
                                    "tiers\t124\t180\t180\tpython scripts/gpu_tiers.py\n"
                                    "soak\tskipped\t0\t3\tpython -m edge_runtime soak\n")
    (work / "pytest.xml").write_text('<testsuites><testsuite tests="2" failures="0" errors="0" skipped="0">'
                                     '<testcase classname="t" name="a" time="1.5"/>'
                                     '<testcase classname="t" name="b" time="0.5"/></testsuite></testsuites>')
    (work / "pytest.log").write_text("..\n2 passed, 9 deselected in 2.0s\n")
    (work / "offload_stack.log").write_text("Traceback (most recent call last):\nRuntimeError: boom\n")
    (work / "tiers.log").write_text("  6 GiB streamer: ok \n")
    res = subprocess.run([sys.executable, "-", str(out), str(work), "450", "222"], input=_summary_code(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stderr  # not all passed
    md = (out / "summary.md").read_text()
    assert md == res.stdout and "PROBLEMS" in md and "2 passed, 9 deselected" in md
    assert "| gpu-marked tests | 0 | 30 (110) | pass |" in md
    assert "| bench_offload.py, random stack | 1 | 5 (75) | FAIL |" in md and "RuntimeError: boom" in md
    assert "timed out after 180 s" in md and "- 6 GiB streamer: ok" in md
    assert "| edge-runtime soak, CUDA statistics | skipped |" in md
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["all_passed"] is False and [s["passed"] for s in summary["steps"]] == [True, False, False, False]
    assert summary["steps"][0]["tests"]["passed"] == 2
