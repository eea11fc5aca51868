"""Every backend loads every checkpoint format through the one opener, open_checkpoint: a
single .safetensors file, a sharded checkpoint (its index, or the folder holding it), a folder
holding model.safetensors, and PyTorch state dicts (plain, wrapped, sharded). The outputs equal,
bit for bit, the resident model loaded from the single file. DeepSpeed's cases are in
test_backend_deepspeed.py (they share its process group)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from edge_runtime.runtime.backends import BackendError, LoadRequest, load_model, open_checkpoint
from offload_models import TinyStack, plan_for, save_formats, save_random

SHAPE = dict(vocab=256, hidden=64, ffn=256, layers=4)
CPU = torch.device("cpu")
FORMATS = ("single", "sharded", "sharded_folder", "folder", "torch", "torch_wrapped", "sharded_bin")
PLACEMENTS = (("resident", "disk"), ("accelerate", "disk"), ("accelerate", "cpu"),
              ("streamer", "disk"), ("streamer", "cpu"))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IDS = torch.randint(0, SHAPE["vocab"], (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def formats(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    single, _ = save_random(root / "tiny.safetensors", **SHAPE)
    return save_formats(single, root / "copies")


def _load(backend: str, path: Path, target: str, dtype: torch.dtype, offload_dir: Path):
    plan = plan_for(SHAPE, 0.3, target=target)
    return load_model(LoadRequest(build=lambda: TinyStack(**SHAPE), checkpoint=path, plan=plan, device=CPU,
                                  dtype=dtype, offload_dir=offload_dir), backend)


def _outputs(loaded) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with torch.inference_mode():
            return loaded.model(IDS), loaded.model(IDS)
    finally:
        loaded.close()


@pytest.fixture(scope="module")
def baseline(formats, tmp_path_factory) -> dict[torch.dtype, torch.Tensor]:
    """The single-file checkpoint under the resident backend: what every case must equal."""
    scratch = tmp_path_factory.mktemp("baseline")
    return {dt: _outputs(_load("resident", formats["single"], "disk", dt, scratch))[0] for dt in DTYPES.values()}


@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("backend,target", PLACEMENTS, ids=[f"{b}-{t}" for b, t in PLACEMENTS])
@pytest.mark.parametrize("fmt", FORMATS)
def test_same_outputs_as_single_file_resident(fmt, backend, target, dtype, formats, baseline, tmp_path):
    plan = plan_for(SHAPE, 0.3, target=target)
    streamed = [b for b in plan.blocks if b.placement == f"stream:{target}"]
    assert len(streamed) >= 2, plan.table()
    loaded = _load(backend, formats[fmt], target, DTYPES[dtype], tmp_path)
    stats = loaded.stats
    first, second = _outputs(loaded)
    assert torch.equal(first, baseline[DTYPES[dtype]]) and torch.equal(second, baseline[DTYPES[dtype]])
    if backend != "resident" and target == "disk":  # the streamed blocks really were read per forward
        assert stats.loads == 2 * len(streamed) and stats.bytes_moved > 0


def test_reader_interface_same_in_every_format(formats):
    single = open_checkpoint(formats["single"])
    names = single.names()
    for fmt in FORMATS:
        ckpt = open_checkpoint(formats[fmt])
        assert sorted(ckpt.names()) == sorted(names), fmt
        assert str(Path(formats[fmt])) in ckpt.describe() or fmt.endswith("folder")
        assert "blocks.0.up.weight" in ckpt and "no.such.tensor" not in ckpt
        mapped = ckpt.map(names)  # spans every shard of a sharded checkpoint
        for name in names:
            a, b = single.entries[name], ckpt.entries[name]
            assert (a.dtype, a.shape, a.nbytes) == (b.dtype, b.shape, b.nbytes), (fmt, name)
            assert torch.equal(ckpt.read(name), single.read(name)), (fmt, name)
            assert torch.equal(mapped[name], single.read(name)), (fmt, name)
        if fmt.startswith("sharded"):
            assert len(ckpt.files) >= 3 and len({ckpt.entries[n].file for n in names}) >= 3


def _mapping_of(ptr: int) -> str | None:
    """The file a process address lies in (from /proc/self/maps), None for anonymous memory
    (the heap and unnamed mappings)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= ptr < hi:
            name = fields[5].strip() if len(fields) == 6 else ""
            return name if name.startswith("/") else None
    return None


@pytest.mark.parametrize("fmt", ["single", "sharded", "torch"])
def test_map_is_zero_copy_and_read_is_private(fmt, formats):
    ckpt = open_checkpoint(formats[fmt])
    name = "blocks.1.down.weight"
    mapped = ckpt.map([name])[name]
    # the tensor's memory is a mapping of the file holding it (its shard, for a sharded one)
    assert _mapping_of(mapped.data_ptr()) == str(ckpt.entries[name].file.resolve())
    copy = ckpt.read(name)
    assert _mapping_of(copy.data_ptr()) is None and torch.equal(copy, mapped)
    copy.add_(1)  # private: the file's bytes are untouched
    assert torch.equal(ckpt.map([name])[name], mapped) and not torch.equal(copy, mapped)


def test_accelerate_disk_index_points_to_each_tensors_shard(formats, tmp_path):
    index = formats["sharded"]
    weight_map = json.loads(index.read_text())["weight_map"]
    loaded = _load("accelerate", index, "disk", torch.float32, tmp_path)
    try:
        seen = {}
        for module in loaded.model.modules():
            weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
            if weights is not None:
                seen.update(weights.dataset.index)
        assert len(seen) >= 3
        for name, info in seen.items():
            assert info["safetensors_file"] == str(index.parent / weight_map[name]), name
        assert len({info["safetensors_file"] for info in seen.values()}) >= 2
    finally:
        loaded.close()
    assert not list(tmp_path.iterdir())  # served from the shards: nothing copied


def test_torch_checkpoint_disk_blocks(formats, tmp_path):
    path = formats["torch"]
    # the streamer maps the state dict's own mmap-backed tensors: nothing written
    loaded = _load("streamer", path, "disk", torch.float32, tmp_path)
    assert loaded.details["store"] == str(path)
    loaded.close()
    assert not list(tmp_path.iterdir())
    # accelerate reads disk blocks from a .safetensors copy, written once in the offload folder
    stores = []
    for _ in range(2):
        loaded = _load("accelerate", path, "disk", torch.float32, tmp_path)
        stores.append((loaded.details["store"], Path(loaded.details["store"]).stat().st_mtime_ns))
        loaded.close()
    assert stores[0] == stores[1] and Path(stores[0][0]).parent == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == [Path(stores[0][0]).name]


# --- errors -------------------------------------------------------------------------------------
def _error(path: Path) -> str:
    with pytest.raises(BackendError) as err:
        open_checkpoint(path)
    message = str(err.value)
    assert str(path) in message, message
    return message


@pytest.mark.parametrize("name", ["gone.safetensors", "gone.pt", "gone.safetensors.index.json", "gone"])
def test_missing_file(name, tmp_path):
    assert "does not exist" in _error(tmp_path / name)


def test_unknown_suffix(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"PK")
    message = _error(path)
    assert "unknown format" in message and ".safetensors" in message and ".pt" in message


def test_folder_without_a_checkpoint(tmp_path):
    assert "model.safetensors" in _error(tmp_path)


@pytest.fixture
def sharded_copy(formats, tmp_path) -> Path:
    folder = tmp_path / "sharded"
    shutil.copytree(formats["sharded"].parent, folder)
    return folder / formats["sharded"].name


def test_index_shard_missing(sharded_copy):
    shard = sharded_copy.parent / json.loads(sharded_copy.read_text())["weight_map"]["blocks.2.up.weight"]
    shard.unlink()
    message = _error(sharded_copy)
    assert str(shard) in message and "does not exist" in message


def test_index_names_a_tensor_twice(sharded_copy):
    weight_map = json.loads(sharded_copy.read_text())["weight_map"]
    pairs = [f'"{k}": "{v}"' for k, v in weight_map.items()]
    pairs.append(f'"blocks.0.up.weight": "{weight_map["head.weight"]}"')
    sharded_copy.write_text('{"metadata": {}, "weight_map": {' + ", ".join(pairs) + "}}")
    message = _error(sharded_copy)
    assert "blocks.0.up.weight" in message and "more than once" in message


def test_index_and_shards_disagree(sharded_copy):
    data = json.loads(sharded_copy.read_text())
    weight_map = data["weight_map"]
    other = next(s for s in weight_map.values() if s != weight_map["embed.weight"])
    weight_map["embed.weight"] = other  # the index now places it in a shard that lacks it
    sharded_copy.write_text(json.dumps(data))
    message = _error(sharded_copy)
    assert "embed.weight" in message and str(sharded_copy.parent / other) in message


def test_tensor_in_two_shards(sharded_copy):
    from safetensors.torch import load_file, save_file

    weight_map = json.loads(sharded_copy.read_text())["weight_map"]
    home = sharded_copy.parent / weight_map["embed.weight"]
    other = sharded_copy.parent / next(s for s in weight_map.values() if s != home.name)
    save_file({**load_file(str(other)), "embed.weight": load_file(str(home))["embed.weight"]}, str(other))
    message = _error(sharded_copy)
    assert "embed.weight" in message and str(home) in message and str(other) in message


@pytest.mark.parametrize("text", ["{not json", '{"metadata": {}}', '{"weight_map": {}}', "[1, 2]"])
def test_malformed_index(text, sharded_copy):
    sharded_copy.write_text(text)
    assert "weight_map" in _error(sharded_copy)


class RunsCode:
    """Unpickling this would call open(marker, "w"), creating the file: proof that it ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_torch_checkpoint_needing_code_is_refused(tmp_path):
    path, marker = tmp_path / "evil.pt", tmp_path / "ran"
    torch.save({"w": torch.ones(2), "config": RunsCode(marker)}, path)
    message = _error(path)
    assert "refusing to unpickle code; save a plain state_dict with torch.save(model.state_dict())" in message
    assert not marker.exists()
    # and through a backend, unchanged
    with pytest.raises(BackendError, match="refusing to unpickle code"):
        _load("streamer", path, "disk", torch.float32, tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("content,expected", [
    ([torch.ones(2)], "holds a list, not a state dict"),
    ({"lr": 0.1, "epoch": 3}, "no tensors"),
    ({"state_dict": {"w": torch.ones(2)}, "model": {"w": torch.ones(2)}}, "tensors under keys"),
    ({"weights": {"w": torch.ones(2)}}, "tensors under keys ['weights']"),
    ({"state_dict": {"w": torch.ones(2), "step": 3}}, "non-tensor values under ['step']"),
], ids=["list", "no-tensors", "two-wrappers", "unknown-wrapper", "mixed-values"])
def test_torch_checkpoint_not_a_state_dict(content, expected, tmp_path):
    path = tmp_path / "bad.pth"
    torch.save(content, path)
    message = _error(path)
    assert expected in message and "torch.save(model.state_dict())" in message


def test_legacy_torch_format(tmp_path):
    path = tmp_path / "legacy.bin"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    assert "legacy" in _error(path)


@pytest.mark.parametrize("backend,target", PLACEMENTS[:4], ids=[f"{b}-{t}" for b, t in PLACEMENTS[:4]])
def test_ignored_keys_are_left_unread(backend, target, formats, baseline, tmp_path):
    """A published checkpoint may hold a training-only tensor the model lacks (Higgs's text_lm_head):
    without ignore_keys every backend refuses it by name; with them it loads as the plain one."""
    from safetensors.torch import load_file, save_file

    extra = tmp_path / "with_head.safetensors"
    save_file({**load_file(str(formats["single"])), "text_lm_head.weight": torch.ones(3, 4)}, str(extra))
    assert "text_lm_head.weight" not in open_checkpoint(extra, ignore=[r"^text_lm_head\."]).names()
    plan = plan_for(SHAPE, 0.3, target=target)

    def request(ignore):
        return LoadRequest(build=lambda: TinyStack(**SHAPE), checkpoint=extra, plan=plan, device=CPU,
                           dtype=torch.float32, offload_dir=tmp_path, ignore_keys=ignore)

    with pytest.raises(BackendError, match="text_lm_head.weight"):
        load_model(request(()), backend).close()
    first, _ = _outputs(load_model(request(("text_lm_head.weight",)), backend))
    assert torch.equal(first, baseline[torch.float32])
