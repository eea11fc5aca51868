"""Runs reference-venv scripts for the CosyVoice parity tests without paying their imports each time.

Started once per test session by cosyvoice_support.py under the reference venv's python. It imports
the heavy modules (torch, upstream CosyVoice: ~12 s here), then reads one job per line on stdin,
`{"argv": [script or "-c", ...], "stdin": "..."}`, and runs each in a child forked from this
process: the child starts from the same state a fresh interpreter would reach after those imports
(module globals a script changes, RNG draws, threads all die with it), so a job behaves as
`python argv...` does, only without the start-up. It answers one JSON line per job:
`{"rc": exit code, "stdout": ..., "stderr": ...}`. Nothing here computes with torch, so forking is safe.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import tempfile
import traceback

PRELOAD = ("torch", "numpy", "hyperpyyaml", "cosyvoice.llm.llm", "cosyvoice.flow.flow",
           "cosyvoice.hifigan.generator", "transformers")


def preload() -> None:
    for name in PRELOAD:
        try:
            __import__(name)
        except Exception:  # a job that needs it reports the error itself, as a fresh process would
            pass


def child(job: dict, out_path: str, err_path: str) -> None:
    """In the forked child: stdio to files, argv and stdin as given, run the script, exit."""
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
    sys.stdout = open(1, "w", closefd=False, buffering=1)
    sys.stderr = open(2, "w", closefd=False, buffering=1)
    stdin_path = out_path + ".in"
    with open(stdin_path, "w") as fh:
        fh.write(job.get("stdin") or "")
    fd = os.open(stdin_path, os.O_RDONLY)
    os.dup2(fd, 0)
    sys.stdin = open(0, "r", closefd=False)
    argv = job["argv"]
    code = 0
    try:
        if argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        else:
            sys.argv = list(argv)
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))  # as `python script.py` does
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    preload()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        folder = tempfile.mkdtemp(prefix="ref_job_")
        out_path, err_path = os.path.join(folder, "out"), os.path.join(folder, "err")
        pid = os.fork()
        if pid == 0:
            child(job, out_path, err_path)
        _, status = os.waitpid(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        with open(out_path, errors="replace") as out, open(err_path, errors="replace") as err:
            answer = {"rc": rc, "stdout": out.read(), "stderr": err.read()}
        for name in os.listdir(folder):
            os.unlink(os.path.join(folder, name))
        os.rmdir(folder)
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
