"""A small random model saved with safetensors, and plans that offload part of it: the common
ground of the backend tests and scripts/bench_offload.py."""

from __future__ import annotations

import types
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from edge_runtime.policy.planner import compute_budget, describe_model, plan
from edge_runtime.policy.planner.layout import GIB


class Block(nn.Module):
    """Pre-norm MLP block; a stand-in for a transformer layer (the unit a plan places)."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.up = nn.Linear(hidden, ffn)
        self.down = nn.Linear(ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class TinyStack(nn.Module):
    """embedding -> N blocks -> norm + head. ``scale`` is a non-persistent fp32 buffer (like mel
    filters or rotary frequencies): backends must keep it, in fp32, though it is not saved."""

    def __init__(self, vocab: int = 256, hidden: int = 128, ffn: int = 512, layers: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(hidden, ffn) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, hidden), persistent=False)

    def components(self) -> dict:
        return {"embed": self.embed, "blocks": list(self.blocks), "head": [self.norm, self.head]}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) * self.scale.to(self.embed.weight.dtype)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def save_random(path: Path, seed: int = 0, **shape) -> tuple[Path, dict]:
    """Random TinyStack weights -> ``path`` (safetensors). Returns (path, shape kwargs)."""
    torch.manual_seed(seed)
    model = TinyStack(**shape)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, shape


def profile(vram_bytes: int, target: str = "disk", prefetch: int = 1, backend: str = "auto",
            keep_resident=(), max_chars: int = 8):
    """A profile-shaped namespace the planner accepts, with a VRAM tier given in bytes."""
    ns = types.SimpleNamespace
    return ns(memory=ns(vram_gib=vram_bytes / GIB, reserve_gib=0.0),
              precision=ns(dtype="fp32", fp32_components=[]),
              offload=ns(backend=backend, target=target, pin_memory=True, prefetch=prefetch,
                         keep_resident=list(keep_resident), offload_dir=None),
              quantization=ns(allowed=(), max_layer_error=0.2, force=None),
              batching=ns(max_batch=1, max_wait_ms=0),
              limits=ns(max_text_chars=max_chars, max_prompt_seconds=0, queue_size=8, request_timeout_s=60))


def plan_for(shape: dict, resident_fraction: float, dtype=torch.float32, **profile_kw):
    """Plan TinyStack(**shape) on a tier holding about ``resident_fraction`` of its weights."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        skeleton = TinyStack(**shape)
    layout = describe_model(skeleton, skeleton.components(), autoregressive=(), dtype=dtype)
    prof = profile(1, **profile_kw)
    budget = compute_budget(prof, layout)
    largest = layout.largest_block_bytes
    vram = int(layout.total_bytes * resident_fraction + budget.activation_bytes
               + (1 + profile_kw.get("prefetch", 1)) * largest + layout.component("head").bytes)
    prof = profile(vram, **profile_kw)
    return plan(layout, prof, compute_budget(prof, layout))


def save_formats(single: Path, root: Path, shards: int = 4) -> dict[str, Path]:
    """The safetensors checkpoint ``single`` written again in every format the backends accept,
    under ``root``: format name -> the path a LoadRequest names. Sharded checkpoints are written
    by huggingface_hub (its own index layout), cut into about ``shards`` shards."""
    import shutil

    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import load_file

    state = load_file(str(single))
    shard_bytes = sum(t.numel() * t.element_size() for t in state.values()) // shards + 1
    out = {"single": single}
    for name, safe in (("sharded", True), ("sharded_bin", False)):
        (root / name).mkdir(parents=True)
        save_torch_state_dict(state, root / name, max_shard_size=shard_bytes, safe_serialization=safe)
        out[name] = root / name / ("model.safetensors.index.json" if safe else "pytorch_model.bin.index.json")
    out["sharded_folder"] = root / "sharded"
    (root / "folder").mkdir()
    shutil.copyfile(single, root / "folder" / "model.safetensors")
    out["folder"] = root / "folder"
    out["torch"] = root / "tiny.pt"
    torch.save(state, out["torch"])
    out["torch_wrapped"] = root / "tiny.ckpt"  # a training checkpoint: weights beside other state
    torch.save({"state_dict": state, "epoch": 3, "hyper_parameters": {"lr": 0.1}}, out["torch_wrapped"])
    return out
