"""Profile loading: shipped files, extends, --set, env var, and an error per kind of mistake."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from edge_runtime.policy import profiles
from edge_runtime.policy.profiles import ENV_VAR, ProfileError, choose_profile, list_profiles, load_profile

SHIPPED = ["cpu", "6gb", "8gb", "12gb", "24gb"]
# The schema other modules code against (profile_schema.py may add keys, never rename these).
CONTRACT = {
    "memory": {"vram_gib", "reserve_gib"},
    "precision": {"dtype", "fp32_components"},
    "offload": {"backend", "target", "pin_memory", "prefetch", "keep_resident", "offload_dir"},
    "cleanup": {"policy", "every_n", "fragmentation_threshold", "malloc_trim"},
    "voice_cache": {"max_entries", "max_mib", "device", "library_dir"},
    "batching": {"max_batch", "max_wait_ms"},
    "limits": {"max_text_chars", "max_prompt_seconds", "queue_size", "request_timeout_s"},
    "runtime": {"threads"},
}


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_list_profiles_smallest_first():
    assert list_profiles() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_loads_with_every_contract_key(name):
    p = load_profile(name, env={})
    assert p.name == name and p.description
    assert Path(p.source) == profiles.profiles_dir() / f"{name}.yaml"
    data = p.to_dict()
    json.dumps(data)  # JSON-serialisable
    for section, keys in CONTRACT.items():
        assert keys <= set(data[section]), section


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_key_has_a_comment(name):
    for line in (profiles.profiles_dir() / f"{name}.yaml").read_text().splitlines():
        if re.match(r"\s+\w+:\s*\S", line):  # an indented key with a value
            assert "#" in line, line


def test_tiers_differ_sensibly():
    p = {n: load_profile(n, env={}) for n in SHIPPED}
    assert p["cpu"].precision.dtype == "fp32" and p["cpu"].offload.backend == "none"
    assert p["24gb"].offload.backend in ("none", "auto")
    assert p["6gb"].voice_cache.max_mib < p["8gb"].voice_cache.max_mib < p["24gb"].voice_cache.max_mib
    assert len(p["6gb"].offload.keep_resident) < len(p["8gb"].offload.keep_resident)
    assert isinstance(p["6gb"].batching.max_batch, int)


def test_profile_is_frozen():
    p = load_profile("8gb", env={})
    with pytest.raises(Exception):
        p.cleanup.policy = "off"  # type: ignore[misc]


def test_extends_and_set_precedence(tmp_path):
    write(tmp_path, "base.yaml", "extends: 8gb\ncleanup:\n  policy: every_n\n  every_n: 4\n")
    user = write(tmp_path, "mine.yaml", "extends: base.yaml\ndescription: mine\ncleanup:\n  every_n: 5\n")
    p = load_profile(str(user), env={})
    assert (p.name, p.description, p.source) == ("mine", "mine", str(user))
    assert (p.cleanup.policy, p.cleanup.every_n) == ("every_n", 5)  # file > extends > its base
    assert p.memory.vram_gib == 8  # inherited from 8gb
    p = load_profile(str(user), ["cleanup.every_n=9", "precision.fp32_components=[codec]"], env={})
    assert p.cleanup.every_n == 9 and p.precision.fp32_components == ("codec",)  # --set > file


def test_set_values_are_yaml_scalars():
    p = load_profile("8gb", ["cleanup.policy=off", "offload.pin_memory=false", "batching.max_batch=3",
                             "offload.offload_dir=/tmp/x", "memory.vram_gib=7.5"], env={})
    assert p.cleanup.policy == "off"  # YAML 1.1 reads bare `off` as false: still the policy
    assert p.offload.pin_memory is False and p.batching.max_batch == 3
    assert p.offload.offload_dir == "/tmp/x" and p.memory.vram_gib == 7.5


def test_profile_choice_order(monkeypatch):
    env = {ENV_VAR: "12gb"}
    assert load_profile(None, env=env).name == "12gb"
    assert load_profile("6gb", env=env).name == "6gb"  # --profile beats the env var
    assert choose_profile(None, env).chosen_by == ENV_VAR
    hw = SimpleNamespace(gpus=[], gpu=None, nvml_gpus=[])
    choice = choose_profile(None, {}, hw)
    assert (choice.spec, choice.chosen_by) == ("cpu", "hardware")
    gpu = SimpleNamespace(name="RTX", total_bytes=int(7.8 * 1024 ** 3), free_bytes=None)
    monkeypatch.setattr("edge_runtime.policy.hardware.probe", lambda *a, **k: SimpleNamespace(
        gpus=[gpu], gpu=gpu, nvml_gpus=[]))
    assert load_profile(None, env={}).name == "8gb"


# (file text or None, overrides, substrings the message must contain)
BAD = {
    "unknown key": ("extends: 8gb\ncleanup:\n  polcy: every_n\n", [],
                    ["bad.yaml", "cleanup.polcy", "did you mean 'cleanup.policy'"]),
    "unknown section": ("extends: 8gb\nmemroy:\n  vram_gib: 8\n", [], ["bad.yaml", "memroy", "'memory'"]),
    "wrong type": ("extends: 8gb\nvoice_cache:\n  max_entries: lots\n", [],
                   ["bad.yaml", "voice_cache.max_entries", "'lots'", "allowed: an integer >= 1"]),
    "bool is not a number": ("extends: 8gb\nmemory:\n  vram_gib: yes\n", [], ["memory.vram_gib", "True"]),
    "out of range": ("extends: 8gb\ncleanup:\n  fragmentation_threshold: 1.5\n", [],
                     ["bad.yaml", "cleanup.fragmentation_threshold", "1.5", "above 0, at most 1"]),
    # values the schema once let through and a later module rejected with a traceback
    "threshold 0": (None, ["cleanup.policy=threshold", "cleanup.fragmentation_threshold=0"],
                    ["--set cleanup.fragmentation_threshold=0", "cleanup.fragmentation_threshold = 0",
                     "allowed: a number above 0, at most 1"]),
    "infinite size": (None, ["voice_cache.max_mib=.inf"], ["voice_cache.max_mib = inf", "finite",
                                                           "allowed: a number of MiB > 0"]),
    "infinite vram": (None, ["memory.vram_gib=.inf"], ["memory.vram_gib = inf", "finite"]),
    "nan": (None, ["limits.max_prompt_seconds=.nan"], ["limits.max_prompt_seconds = nan", "finite"]),
    "threads": (None, ["runtime.threads=100000"], ["runtime.threads = 100000", "allowed: an integer from 0 to 1024"]),
    "bad choice": ("extends: 8gb\nprecision:\n  dtype: int8\n", [],
                   ["precision.dtype", "'int8'", "auto, bf16, fp16 or fp32"]),
    "union": ("extends: 8gb\nbatching:\n  max_batch: 0\n", [], ["batching.max_batch", "auto or an integer >= 1"]),
    "cross-field": ("extends: 8gb\noffload:\n  backend: deepspeed\n  target: disk\n", [],
                    ["bad.yaml", "offload.target", "deepspeed"]),
    "missing key": ("name: x\nmemory:\n  vram_gib: 8\n", [], ["bad.yaml", "memory.reserve_gib", "extends"]),
    "invalid YAML": ("extends: 8gb\nmemory: [1\n", [], ["bad.yaml", "invalid YAML", "line"]),
    "not a mapping": ("- 1\n- 2\n", [], ["bad.yaml", "mapping"]),
    "bad extends": ("extends: 9gb\n", [], ["unknown profile '9gb'", "8gb"]),
    "reserved key": ("extends: 8gb\nsource: x\n", [], ["bad.yaml", "source"]),
    "set unknown key": (None, ["cleanup.polcy=x"], ["--set", "cleanup.polcy", "did you mean 'cleanup.policy'"]),
    "set wrong section": (None, ["memory.policy=x"], ["memory.policy", "cleanup.policy"]),
    "set bad value": (None, ["cleanup.policy=bogus"], ["--set cleanup.policy=bogus", "8gb.yaml", "cleanup.policy",
                                                       "'bogus'", "per_request, every_n, threshold or off"]),
    "set no equals": (None, ["cleanup.policy"], ["--set", "KEY.PATH=VALUE"]),
    "set empty key": (None, ["=3"], ["--set", "KEY.PATH=VALUE"]),
    "set into a value": (None, ["memory.vram_gib.x=1"], ["memory.vram_gib is a value"]),
    "set bad YAML": (None, ["limits.queue_size=[1"], ["limits.queue_size", "not valid YAML"]),
    "set out of range": (None, ["memory.reserve_gib=9"], ["--set memory.reserve_gib=9", "memory.reserve_gib"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_invalid_profile_messages(tmp_path, case):
    text, overrides, expected = BAD[case]
    spec = str(write(tmp_path, "bad.yaml", text)) if text is not None else "8gb"
    with pytest.raises(ProfileError) as info:
        load_profile(spec, overrides, env={})
    for part in expected:
        assert part in str(info.value), (part, str(info.value))


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(ProfileError, match="profile file not found: .*nope.yaml"):
        load_profile(str(tmp_path / "nope.yaml"), env={})
    with pytest.raises(ProfileError, match=r"unknown profile '8bg' \(did you mean '8gb'\?\)"):
        load_profile("8bg", env={})
    with pytest.raises(ProfileError, match="unknown profile 'nope'"):
        load_profile(None, env={ENV_VAR: "nope"})


def test_extends_cycle(tmp_path):
    write(tmp_path, "a.yaml", "extends: b.yaml\n")
    write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ProfileError, match=r"extends cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_profile(str(tmp_path / "a.yaml"), env={})


def test_profile_error_is_a_value_error():
    from edge_runtime.errors import EdgeRuntimeError

    assert issubclass(ProfileError, ValueError) and issubclass(ProfileError, EdgeRuntimeError)
