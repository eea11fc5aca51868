#!/usr/bin/env bash
# The one command to run when a CUDA machine is available: every check that needs a GPU, in at
# most ~8 minutes on one H100/H200, with a Markdown and a JSON summary.
#
#   scripts/gpu_check.sh OUT_DIR
#
# Steps (each under its own timeout; a failing step never stops the next one):
#   env       nvidia-smi, torch/CUDA versions, compute capability, package versions
#   pytest    every `gpu`-marked test (python -m pytest -m gpu tests)
#   offload   scripts/bench_offload.py on CUDA: the random stack (with per-backend peaks), the Piper voice
#   soak      `edge-runtime soak`: a few requests, baseline vs all techniques, CUDA allocator statistics
#   tiers     scripts/gpu_tiers.py on emulated 6/8/12/24 GiB tiers (resident, accelerate, streamer);
#             last, as the longest: it gets what the budget has left (rows print as they finish)
#
# OUT_DIR receives at most 7 files: summary.md, summary.json (every step: command, exit status,
# seconds, key figures, and the step's JSON inlined), gpu_tiers.json, offload_stack.json,
# offload_piper.json, soak.json and logs.txt (each step's full output). The summary is also printed.
# Exit status: 0 when every step passed, 1 when any failed or timed out, 2 without CUDA (before any
# step runs), 64 on a usage error.
#
# Python: .venv/bin/python, set up first with ./launch.sh's install when .venv is missing. Set
# GPU_CHECK_PYTHON to use another interpreter that has the project's dependencies (e.g. a machine
# with no network, where launch.sh cannot install). GPU_CHECK_BUDGET_S (default 450) caps the
# steps; each step's timeout is cut to what is left of it (worst case ~7.7 minutes in all).
set -uo pipefail

usage() { echo "usage: $0 OUT_DIR   (see the header of $0)" >&2; exit 64; }
[ $# -eq 1 ] && [ -n "$1" ] || usage
case "$1" in -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT_ARG=$1
cd "$REPO" || exit 1

# -- interpreter --------------------------------------------------------------------------------
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
    PY=$GPU_CHECK_PYTHON
else
    if [ ! -x .venv/bin/python ] || [ ! -f .venv/.edge_runtime_installed ]; then
        echo "gpu_check: setting up .venv with ./launch.sh (one-time install)" >&2
        ./launch.sh --version >&2 || { echo "gpu_check: ./launch.sh could not set up .venv" >&2; exit 1; }
    fi
    PY=$REPO/.venv/bin/python
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# -- CUDA or nothing ----------------------------------------------------------------------------
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    echo "gpu_check: no CUDA GPU: torch.cuda.is_available() is False for $PY (or torch does not import);" \
         "nothing was run. Run this on a machine with an NVIDIA GPU and a CUDA build of torch." >&2
    exit 2
fi

mkdir -p "$OUT_ARG" || exit 1
OUT=$(cd "$OUT_ARG" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 1
trap 'rm -rf "$WORK"' EXIT
STEPS=$WORK/steps.tsv
: >"$STEPS"
: >"$OUT/logs.txt"
rm -f "$OUT"/{summary.md,summary.json,gpu_tiers.json,offload_stack.json,offload_piper.json,soak.json}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
RESERVE=15  # seconds kept for the summary
START=$(date +%s)

# step NAME TIMEOUT_S COMMAND...: run under `timeout` (whole process group), log, record the status.
step() {
    local name=$1 limit=$2 rc t0 t1 left
    shift 2
    left=$((BUDGET - RESERVE - ($(date +%s) - START)))
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name: $* (timeout ${limit} s)" | tee -a "$OUT/logs.txt"
    if [ "$limit" -lt 10 ]; then
        echo "   skipped: the ${BUDGET} s budget is spent" | tee -a "$OUT/logs.txt"
        printf '%s\t%s\t%s\t%s\t%s\n' "$name" "skipped" 0 "$limit" "$*" >>"$STEPS"
        return
    fi
    t0=$(date +%s)
    timeout -k 15 "$limit" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    t1=$(date +%s)
    cat "$WORK/$name.log" >>"$OUT/logs.txt"
    echo "== $name: exit $rc after $((t1 - t0)) s" | tee -a "$OUT/logs.txt"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$((t1 - t0))" "$limit" "$*" >>"$STEPS"
}

# -- (e) environment facts ------------------------------------------------------------------------
env_facts() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi || echo "nvidia-smi: exit $?"
        nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current \
            --format=csv,noheader | sed 's/^/gpu (name, memory, driver, PCIe gen, width): /' || true
    else
        echo "nvidia-smi: not found"
    fi
    "$PY" - "$WORK/env.json" <<'EOF'
import importlib.metadata as md, json, platform, subprocess, sys
import torch
d = torch.cuda.current_device()
p = torch.cuda.get_device_properties(d)
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
except OSError:
    commit = None
facts = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
         "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
         "device_count": torch.cuda.device_count(), "device": p.name,
         "capability": "%d.%d" % torch.cuda.get_device_capability(d),
         "total_memory_gib": round(p.total_memory / 2**30, 2), "multiprocessors": p.multi_processor_count,
         "bf16_supported": torch.cuda.is_bf16_supported(), "git_commit": commit,
         "packages": {n: version(n) for n in ("edge-runtime", "accelerate", "deepspeed", "transformers",
                                              "safetensors", "onnx", "numpy", "pydantic")}}
print(json.dumps(facts, indent=2))
open(sys.argv[1], "w").write(json.dumps(facts, indent=2))
EOF
}
export -f env_facts
export PY WORK
step env 45 bash -c env_facts

# -- (a) every gpu-marked test ----------------------------------------------------------------------
step pytest 110 "$PY" -m pytest -m gpu tests -q -rfEs -p no:cacheprovider --junitxml="$WORK/pytest.xml"

# -- (c) offload backends on CUDA -------------------------------------------------------------------
# Two runs, so a slow model cannot cost the other its table: the 400 MB random stack with each
# backend's peak VRAM (own processes), then the embedded Piper voice (latency only).
step offload_stack 75 "$PY" scripts/bench_offload.py --models stack --repeats 3 --out "$OUT/offload_stack.json"
step offload_piper 55 "$PY" scripts/bench_offload.py --models piper --repeats 3 --no-peaks \
    --out "$OUT/offload_piper.json"

# -- (d) short soak with CUDA statistics ------------------------------------------------------------
step soak 70 "$PY" -m edge_runtime soak -n 8 --warmup 3 --configs baseline all -o "$WORK/soak"
[ -f "$WORK/soak/soak.json" ] && cp "$WORK/soak/soak.json" "$OUT/soak.json"

# -- (b) emulated VRAM tiers ------------------------------------------------------------------------
# 64 layers (~5.5 GiB in bf16): the 6 GiB tier must offload, 8-24 GiB hold it resident. DeepSpeed is
# left to the offload bench (its start-up alone would eat this step's time on 4 tiers).
step tiers 180 "$PY" scripts/gpu_tiers.py --tiers 6,8,12,24 --backends resident,accelerate,streamer \
    --layers 64 --tokens 128 --warmup 1 --repeats 3 --child-timeout 60 -o "$OUT/gpu_tiers.json"

# -- summary ----------------------------------------------------------------------------------------
"$PY" - "$OUT" "$WORK" "$BUDGET" "$(($(date +%s) - START))" <<'PYEOF'
"""summary.md and summary.json from the steps' statuses, logs and JSON outputs."""
import json, re, sys, xml.etree.ElementTree as ET
from pathlib import Path

out, work, budget, elapsed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
JSON = {"env": [work / "env.json"], "tiers": [out / "gpu_tiers.json"], "offload_stack": [out / "offload_stack.json"],
        "offload_piper": [out / "offload_piper.json"], "soak": [out / "soak.json"]}
TITLES = {"env": "environment", "pytest": "gpu-marked tests", "tiers": "gpu_tiers.py, emulated 6/8/12/24 GiB tiers",
          "offload_stack": "bench_offload.py, random stack", "offload_piper": "bench_offload.py, Piper voice",
          "soak": "edge-runtime soak, CUDA statistics"}
# gpu_tiers rows that are faults: an OOM under a plan that said it fits is the planner wrong;
# "does not fit (plan)" and "refused" (the streamer on a resident plan) are expected rows
BAD_ROW = ("failed", "crashed", "timed out", "does not fit (OOM)")


def load(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def tables(log):
    """Markdown table blocks (consecutive lines starting with '|') from a log."""
    blocks, cur = [], []
    for line in log.splitlines() + [""]:
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            blocks.append("\n".join(cur))
            cur = []
    return blocks


def pytest_facts(log):
    facts = {}
    try:
        suite = ET.parse(work / "pytest.xml").getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        facts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        facts["passed"] = facts["tests"] - facts["failures"] - facts["errors"] - facts["skipped"]
        facts["cases"] = []
        for case in suite.iter("testcase"):
            bad = [c for c in case if c.tag in ("failure", "error", "skipped")]
            facts["cases"].append({"test": f"{case.get('classname')}::{case.get('name')}",
                                   "outcome": bad[0].tag if bad else "passed", "seconds": float(case.get("time", 0)),
                                   "message": bad[0].get("message", "")[:300] if bad else ""})
    except (OSError, ET.ParseError, AttributeError, TypeError):
        pass
    lines = [line for line in log.splitlines() if re.match(r"^(FAILED|ERROR|SKIPPED) ", line)]
    last = [line for line in log.splitlines() if re.search(r"\d+ (passed|failed|skipped|errors?|deselected)", line)]
    facts["result_line"] = last[-1].strip("= ") if last else None
    facts["short_summary"] = lines
    return facts


steps, all_ok = [], True
for row in (work / "steps.tsv").read_text().splitlines():
    name, rc, seconds, limit, command = row.split("\t", 4)
    log_path = work / f"{name}.log"
    log = log_path.read_text(errors="replace") if log_path.exists() else ""
    step = {"name": name, "title": TITLES.get(name, name), "command": command, "timeout_s": int(limit),
            "seconds": int(seconds), "exit": None if rc == "skipped" else int(rc), "problems": []}
    if rc == "skipped":
        step["problems"].append("skipped: the time budget was spent")
    elif int(rc) in (124, 137):
        step["problems"].append(f"timed out after {limit} s")
    elif int(rc) != 0:
        step["problems"].append(f"exit status {rc}")
    step["outputs"] = {p.name: load(p) for p in JSON.get(name, []) if p.exists()}
    if step["exit"] == 0 and any(not p.exists() for p in JSON.get(name, [])):
        step["problems"].append("its JSON output was not written")
    step["tables"] = tables(log)
    step["lines"] = []
    if name == "pytest":
        step["tests"] = pytest_facts(log)
        if step["tests"].get("tests", 0) == 0:
            step["problems"].append("no gpu-marked test ran")
    elif name == "tiers":
        data = step["outputs"].get("gpu_tiers.json") or {}
        for r in [data.get("baseline") or {}, *data.get("rows", [])]:
            if str(r.get("status", "")).startswith(BAD_ROW):
                step["problems"].append(f"tier {r.get('tier_gib')} {r.get('backend')}: {r['status']}: "
                                        f"{str(r.get('error', '')).strip()[-200:]}")
        step["lines"] = [line.strip() for line in log.splitlines()  # rows print as they finish
                         if line.startswith(("measured ", "checkpoint ")) or re.match(r"^  \d+ GiB ", line)]
    elif name.startswith("offload"):
        data = next(iter(step["outputs"].values()), None) or {}
        for r in data.get("rows", []):
            if "error" in r:
                step["problems"].append(f"{r['model']} {r['backend']} peak process: {r['error']}")
        step["lines"] = [line for line in log.splitlines() if line.startswith(("device ", "streamer faster"))]
    elif name == "soak":
        data = step["outputs"].get("soak.json") or {}
        for s in data.get("summary", []):
            if s.get("stopped"):
                step["problems"].append(f"{s['config']}: {s['stopped']}")
            if s.get("cuda_peak_mib") is None:
                step["problems"].append(f"{s['config']}: no CUDA statistics recorded (ran on the CPU?)")
    elif name == "env":
        step["lines"] = [line.strip() for line in log.splitlines() if line.startswith("gpu (name")]
    step["passed"] = not step["problems"]
    all_ok = all_ok and step["passed"]
    step["log_tail"] = log.splitlines()[-20:]
    steps.append(step)

env = next((s["outputs"].get("env.json") for s in steps if s["name"] == "env"), None) or {}
summary = {"all_passed": all_ok, "seconds": elapsed, "budget_s": budget, "env": env,
           "steps": [{k: v for k, v in s.items() if k != "log_tail"} for s in steps]}
(out / "summary.json").write_text(json.dumps(summary, indent=2))

md = [f"# edge_runtime GPU check: {'all passed' if all_ok else 'PROBLEMS'}", ""]
if env:
    md += [f"{env.get('device')} (compute capability {env.get('capability')}, {env.get('total_memory_gib')} GiB, "
           f"bf16 {env.get('bf16_supported')}); torch {env.get('torch')}, CUDA {env.get('torch_cuda')}, "
           f"Python {env.get('python')}; commit {env.get('git_commit')}.", ""]
md += [f"{elapsed} s in all (budget {budget} s).", "", "| step | exit | seconds (timeout) | verdict |",
       "|---|---|---|---|"]
for s in steps:
    md.append(f"| {s['title']} | {'skipped' if s['exit'] is None else s['exit']} | {s['seconds']} "
              f"({s['timeout_s']}) | {'pass' if s['passed'] else 'FAIL'} |")
for s in steps:
    status = "skipped" if s["exit"] is None else f"exit {s['exit']}, {s['seconds']} s"
    md += ["", f"## {s['title']}", "", f"`{s['command']}`: {status}", ""]
    md += [f"- problem: {p}" for p in s["problems"]] + ([""] if s["problems"] else [])
    if s["name"] == "env" and env:
        md += ["```", json.dumps(env, indent=2), "```"]
    if s["name"] == "pytest":
        t = s.get("tests", {})
        md.append(t.get("result_line") or "no pytest result line")
        md += [f"    {line}" for line in t.get("short_summary", [])]
        slow = sorted(t.get("cases", []), key=lambda c: -c["seconds"])[:5]
        if slow:
            md += ["", "slowest: " + ", ".join(f"{c['test'].split('::')[-1]} {c['seconds']:.1f} s" for c in slow)]
    md += [f"- {line}" for line in s["lines"]]
    for block in s["tables"]:
        md += ["", block]
    if s["log_tail"] and (s["problems"] or not (s["tables"] or s["lines"] or s["name"] in ("env", "pytest"))):
        md += ["", "log tail:", "```", *s["log_tail"], "```"]
md += ["", "Files: summary.json (every step, its JSON inlined), gpu_tiers.json, offload_stack.json, "
       "offload_piper.json, soak.json, logs.txt (every step's full output)."]
(out / "summary.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
sys.exit(0 if all_ok else 1)
PYEOF
