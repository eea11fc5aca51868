"""The `edge-runtime` CLI: in process via main([...]); a few smoke tests start the real console
script and `python -m edge_runtime` (exit codes, --help, the environment variable)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

from edge_runtime import __version__

from edge_runtime.serving import cli
from edge_runtime.policy.profiles import ENV_VAR, list_profiles


def _console(*args: str, env_profile: str | None = None) -> subprocess.CompletedProcess:
    """The installed `edge-runtime` console script (next to this interpreter) as a user runs it."""
    import os
    import shutil

    script = shutil.which("edge-runtime", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.fail(f"no edge-runtime console script next to {sys.executable}: is the package installed (pip install -e .)?")
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    if env_profile:
        env[ENV_VAR] = env_profile
    return subprocess.run([script, *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(autouse=True)
def _no_env_profile(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"edge-runtime {__version__}"


def test_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("doctor", "profiles", "--profile", "--set"):
        assert name in out


def test_no_command_is_usage_error(capsys):
    assert cli.main([]) == 2
    assert "usage" in capsys.readouterr().err


def test_every_registered_command_has_add_parser():
    for name in cli.COMMANDS:
        module = importlib.import_module(f"edge_runtime.serving.commands.{name}")
        assert callable(module.add_parser), name


def test_profiles_list(capsys):
    assert cli.main(["profiles", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list_profiles()
    assert cli.main(["profiles", "list"]) == 0
    assert "24gb" in capsys.readouterr().out


def test_profiles_show_resolved_values(capsys):
    assert cli.main(["profiles", "show", "8gb", "--json", "--set", "cleanup.policy=every_n"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["name"] == "8gb" and data["cleanup"]["policy"] == "every_n"
    # --profile/--set also work before the subcommand; both --set lists apply.
    assert cli.main(["--profile", "6gb", "--set", "cleanup.every_n=3", "profiles", "show", "--json",
                     "--set", "limits.queue_size=7"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["name"], data["cleanup"]["every_n"], data["limits"]["queue_size"]) == ("6gb", 3, 7)
    assert cli.main(["profiles", "show", "cpu"]) == 0
    assert "policy: per_request" in capsys.readouterr().out


def test_doctor_json_fields(capsys):
    assert cli.main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["edge_runtime"] == __version__
    hw = report["hardware"]
    for key in ("gpus", "cpu", "ram_total_bytes", "ram_available_bytes", "disk_path", "disk_free_bytes",
                "torch_version", "driver_version", "notes"):
        assert key in hw, key
    for key in ("model", "logical_cores", "physical_cores", "isa", "bf16_native"):
        assert key in hw["cpu"], key
    prof = report["profile"]
    assert prof["name"] in list_profiles() and prof["chosen_by"] == "hardware" and prof["explanation"]
    assert report["dtype"]["resolved"] in ("bf16", "fp16", "fp32") and report["dtype"]["reason"]
    names = {p["name"]: p for p in report["packages"]}
    for name in ("torch", "accelerate", "deepspeed", "transformers", "onnx", "espeakng-loader", "fastapi", "uvicorn"):
        assert name in names, name
    assert names["torch"]["installed"]
    for row in names.values():
        if not row["installed"] and row["applies"]:
            assert row["install"].startswith("pip install ") and row["install"] in report["missing"]
    assert isinstance(report["warnings"], list)


def test_doctor_text_with_profile(capsys):
    assert cli.main(["doctor", "--profile", "12gb", "--set", "precision.dtype=bf16"]) == 0
    out = capsys.readouterr().out
    assert "12gb" in out and "chosen by --profile" in out and "Packages" in out


def test_doctor_json_profile_from_the_environment(capsys, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "6gb")
    assert cli.main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["profile"]["name"] == "6gb" and report["profile"]["chosen_by"] == ENV_VAR


@pytest.mark.parametrize("args, message", [
    (["--profile", "no_such_profile", "profiles", "show"], "unknown profile 'no_such_profile'"),
    (["profiles", "show", "8gb", "--set", "cleanup.policy=bogus"], "cleanup.policy"),
    (["doctor", "--set", "cleanup.polcy=1"], "did you mean 'cleanup.policy'"),
    (["profiles", "show", "8gb", "--set", "cleanup.fragmentation_threshold=0"], "allowed: a number above 0"),
])
def test_bad_profile_exits_2_without_traceback(args, message, capsys):
    assert cli.main(args) == 2  # an uncaught exception (a traceback) would fail the test here
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


# -- the real console script: a few subprocess smoke tests ------------------------------------
def test_console_script_starts_and_prints_help():
    res = _console("--help")
    assert res.returncode == 0, res.stderr
    assert "usage: edge-runtime" in res.stdout and "doctor" in res.stdout


def test_console_script_exit_codes():
    res = _console("--profile", "no_such_profile", "profiles", "show")
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert res.stderr.startswith("error: ") and "unknown profile 'no_such_profile'" in res.stderr
    assert "Traceback" not in res.stderr
    res = _console()  # no command: usage on stderr
    assert res.returncode == 2 and "usage: edge-runtime" in res.stderr


def test_python_dash_m_runs_the_cli():
    res = subprocess.run([sys.executable, "-m", "edge_runtime", "--version"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == f"edge-runtime {__version__}"


def test_bad_profile_in_process(capsys):
    assert cli.main(["profiles", "show", "nope.yaml"]) == 2
    assert "profile file not found" in capsys.readouterr().err


def test_cli_import_does_not_import_torch():
    code = "import sys, edge_runtime.serving.cli, edge_runtime.policy.profiles; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "False", res.stderr
