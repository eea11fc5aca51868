"""Plan before download: `edge-runtime plan` needs config files only. A folder holding only configs
plans exactly as with weights, codecs held by processors included; a hub id with nothing cached says
which files it needs, and `--allow-download` asks the hub for config files, never weights."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from edge_runtime.models.source import CONFIG_PATTERNS
from edge_runtime.serving.cli import main
from hf_tiny_csm import build_tiny_csm
from hf_tiny_dia import build_tiny_dia
from hf_tiny_pocket_tts import build_tiny_pocket_tts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from published_configs import write_csm, write_dia, write_pocket_tts  # noqa: E402

GIB = 1024**3
BUILDERS = {"csm": build_tiny_csm, "dia": build_tiny_dia, "pocket_tts": build_tiny_pocket_tts}


def plan(capsys, model: Path | str, profile: str, *extra: str) -> dict:
    capsys.readouterr()
    code = main(["plan", "--model", str(model), "--profile", profile, "--json", *extra])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    data.pop("model")  # the path differs
    return data


def configs_only(folder: Path, dest: Path) -> Path:
    """What `--allow-download` fetches for planning: the config files, no weights."""
    for path in folder.rglob("*"):
        if path.is_file() and any(path.match(p) for p in CONFIG_PATTERNS):
            target = dest / path.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    assert not list(dest.rglob("*.safetensors"))
    return dest


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_config_only_folder_plans_as_with_weights(family, tmp_path, capsys):
    full = BUILDERS[family](tmp_path / "full")
    bare = configs_only(full, tmp_path / "bare")
    for profile in ("6gb", "12gb"):
        assert plan(capsys, bare, profile) == plan(capsys, full, profile)
    # loading needs the weights: a clear error, no traceback
    assert main(["say", "--model", str(bare), "Hi.", "-o", str(tmp_path / "x.wav")]) == 2
    err = capsys.readouterr().err
    assert "lacks model.safetensors" in err and "plan" in err and "Traceback" not in err


@pytest.mark.parametrize("write,codec,codec_gib", [(write_csm, None, None), (write_dia, "codec", 0.285),
                                                    (write_pocket_tts, "audio_tokenizer", 0.075)])
def test_published_configs_plan_with_their_codecs(write, codec, codec_gib, tmp_path, capsys):
    folder = write(tmp_path / "model")
    for profile in ("6gb", "12gb"):
        data = plan(capsys, folder, profile)
        parts = {b["submodel"] for b in data["blocks"]}
        if codec is None:  # CSM holds its Mimi codec itself: one checkpoint
            assert parts == {""} and any(b["component"] == "codec" for b in data["blocks"])
            continue
        assert parts == {"", codec}
        blocks = [b for b in data["blocks"] if b["submodel"] == codec]
        assert [b["name"] for b in blocks] == [f"{codec}:"]
        assert blocks[0]["bytes"] / GIB == pytest.approx(codec_gib, abs=0.001)  # fp32 under bf16
        assert data["dtype"].startswith("bf16") and data["peak_vram_bytes"] < int(profile[:-2]) * GIB
        assert data["max_batch"] >= 1


def test_hub_id_with_nothing_cached_names_the_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert main(["plan", "--model", "edge-tests/not-cached"]) == 2
    err = capsys.readouterr().err
    assert "config files" in err and "*.json" in err and "no weights" in err and "--allow-download" in err
    assert "Traceback" not in err


def test_allow_download_fetches_config_files_only(tmp_path, monkeypatch, capsys):
    """The hub is asked for config patterns only, for the model and for the codec its processor names
    by hub id (the published Dia's descript/dac_44khz), and the plan includes that codec."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    repos = {"nari-labs/Dia-1.6B": lambda d: write_dia(d), "descript/dac_44khz": lambda d: write_dac(d)}
    calls = []

    def write_dac(folder: Path) -> Path:
        shutil.copytree(write_dia(tmp_path / "scratch") / "dac", folder)
        return folder

    def fake_snapshot_download(repo_id, local_files_only=False, allow_patterns=None, **kwargs):
        calls.append((repo_id, local_files_only, allow_patterns))
        folder = tmp_path / "hub" / repo_id.replace("/", "--")
        if local_files_only and not folder.exists():
            raise LocalEntryNotFoundError(f"{repo_id} not cached")
        if not folder.exists():
            repos[repo_id](folder)
            if repo_id == "nari-labs/Dia-1.6B":  # the hub layout: the codec named by hub id, no dac/
                shutil.rmtree(folder / "dac")
                settings = json.loads((folder / "processor_config.json").read_text())
                settings["audio_tokenizer"]["audio_tokenizer_name_or_path"] = "descript/dac_44khz"
                (folder / "processor_config.json").write_text(json.dumps(settings))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    data = plan(capsys, "nari-labs/Dia-1.6B", "6gb", "--allow-download")
    assert {b["submodel"] for b in data["blocks"]} == {"", "codec"}
    fetched = [c for c in calls if not c[1]]
    assert [c[0] for c in fetched] == ["nari-labs/Dia-1.6B", "descript/dac_44khz"]
    assert all(c[2] == list(CONFIG_PATTERNS) for c in calls)  # never weights, cached or fetched
    assert not any(p.endswith((".safetensors", ".bin", ".pt")) for p in CONFIG_PATTERNS)
