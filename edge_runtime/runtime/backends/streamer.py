"""The prefetching streamer: accelerate-style hooks on each streamed block, plus what
accelerate's hooks lack - the next block's weights are fetched while the current block computes.

* Where streamed weights wait: ``stream:cpu`` in host RAM in the compute dtype (pinned once, up
  front, when the execution device is CUDA); ``stream:disk`` in the checkpoint file itself
  (memory-mapped, whatever its format: a safetensors file or shard, or a PyTorch state dict's
  mmap-backed tensors; a converted copy in the offload folder when the dtype differs).
* How they arrive: one worker thread fetches ahead. On CUDA it copies on a side stream and the
  compute stream waits on an event, so PCIe transfers hide behind compute. On the CPU a disk
  block is mapped with MAP_POPULATE in the worker: the page cache is filled and the page tables
  built before the block runs, and the weights are used in place, with no copy at all.
* What comes next: learned from the order blocks actually ran (block -> the block that followed
  it last time), starting from layout order, so AR loops (last layer -> first) are predicted after one pass; a block
  seen running several times in a row (a vocoder decoding chunk after chunk) is kept until a
  different block starts or the request ends, instead of being reloaded per call.
At most 1 + prefetch streamed blocks hold memory at a time.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
from torch import nn

from edge_runtime.policy.planner.plan import Plan
from edge_runtime.runtime.backends.base import Backend, LoadedModel, LoadRequest, TransferStats
from edge_runtime.runtime.backends.checkpoint import CheckpointSource, open_checkpoint
from edge_runtime.runtime.backends.loading import build_skeleton, check_complete, load_tensors, owner, split_name
from edge_runtime.runtime.backends.offload_store import disk_store_for
from edge_runtime.runtime.backends.placement import cpu_compute_hooks


@dataclass
class _Slot:
    module: nn.Module
    attr: str
    is_param: bool
    placeholder: torch.Tensor  # the meta tensor put back when the block is dropped


@dataclass
class _Block:
    name: str
    nbytes: int
    slots: dict[str, _Slot] = field(default_factory=dict)  # checkpoint name -> where it goes
    host: dict[str, torch.Tensor] = field(default_factory=dict)  # stream:cpu weights
    from_disk: bool = False


class _Fetched:
    """One block's weights on the execution device (and the event marking the copy done)."""

    def __init__(self, tensors: dict[str, torch.Tensor], event, moved: int) -> None:
        self.tensors, self.event, self.moved = tensors, event, moved


class WeightStreamer:
    def __init__(self, blocks: list[_Block], device: torch.device, prefetch: int,
                 store: CheckpointSource | None, stats: TransferStats) -> None:
        self.blocks = {b.name: b for b in blocks}
        self.order = [b.name for b in blocks]
        self.device = device
        self.prefetch = prefetch
        self.store = store
        self.stats = stats
        self.cuda = device.type == "cuda"
        self.side = torch.cuda.Stream(device) if self.cuda else None
        # On the CPU the prefetch thread competes with compute for the same cores; at the lowest
        # priority it uses the cycles compute leaves idle (and I/O waits), never a compute core.
        # On CUDA it only queues copies, so it keeps normal priority.
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-prefetch",
                                       initializer=None if self.cuda else _lowest_priority)
        self.next_of: dict[str, str] = {}
        self.repeats: set[str] = set()  # blocks seen running twice in a row (chunked decoding)
        self.last: str | None = None
        self.inflight: dict[str, Future] = {}
        self.active: dict[str, _Fetched] = {}

    # -- fetching (runs in the worker thread, or inline when nothing was prefetched) -----------
    def _fetch(self, name: str) -> _Fetched:
        block = self.blocks[name]
        if block.from_disk:
            source = self.store.map(list(block.slots), populate=True)
            moved = block.nbytes  # read from the store (page cache or disk) into the mapping
        else:
            source = block.host
            moved = 0
        if not self.cuda:
            return _Fetched(source, None, moved)
        with torch.cuda.stream(self.side):
            tensors = {k: t.to(self.device, non_blocking=True) for k, t in source.items()}
            event = torch.cuda.Event()
            event.record(self.side)
        return _Fetched(tensors, event, block.nbytes)

    # -- prediction -------------------------------------------------------------------------
    def _upcoming(self, name: str) -> list[str]:
        out, cur = [], name
        for _ in range(self.prefetch):
            nxt = self.next_of.get(cur)
            if nxt is None:
                i = self.order.index(cur)
                nxt = self.order[(i + 1) % len(self.order)]
            if nxt in out or nxt == name:
                break
            out.append(nxt)
            cur = nxt
        return out

    # -- hook entry points --------------------------------------------------------------------
    def acquire(self, name: str) -> None:
        if self.last == name:
            self.repeats.add(name)
        elif self.last is not None:
            self.next_of[self.last] = name
            self._drop(self.last)  # a repeating block was kept after its forward: not needed now
        self.last = name
        fetched = self.active.get(name)
        if fetched is None:
            future = self.inflight.pop(name, None)
            start = time.perf_counter()
            fetched = future.result() if future is not None else self._fetch(name)
            self.stats.waits_s += time.perf_counter() - start
            self.stats.bytes_moved += fetched.moved
            self.stats.loads += 1
            if fetched.event is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(fetched.event)
                for t in fetched.tensors.values():
                    t.record_stream(current)  # the allocator must not reuse it while compute reads it
            self._install(name, fetched)
        upcoming = self._upcoming(name)
        for stale in [k for k in self.inflight if k not in upcoming]:
            self.inflight.pop(stale).cancel()  # a misprediction: its memory goes back
        for nxt in upcoming:
            if nxt not in self.inflight and nxt not in self.active:
                self.inflight[nxt] = self.pool.submit(self._fetch, nxt)

    def release(self, name: str) -> None:
        if name not in self.repeats:  # a repeating block stays until another block starts
            self._drop(name)

    def _drop(self, name: str) -> None:
        fetched = self.active.pop(name, None)
        if fetched is None:
            return
        for slot in self.blocks[name].slots.values():
            _set(slot, slot.placeholder)

    def _install(self, name: str, fetched: _Fetched) -> None:
        for key, slot in self.blocks[name].slots.items():
            value = fetched.tensors[key]
            _set(slot, nn.Parameter(value, requires_grad=False) if slot.is_param else value)
        self.active[name] = fetched

    def end_request(self) -> None:
        """Drop blocks kept for repeated calls; prefetched ones stay (they start the next request)."""
        for name in [n for n in self.active if n in self.repeats]:
            self._drop(name)
        self.last = None  # the next request's first block is not a repeat of this one's last

    def close(self) -> None:
        for future in self.inflight.values():
            future.cancel()
        self.pool.shutdown(wait=True)
        for name in list(self.active):
            self._drop(name)
        self.inflight.clear()


def _lowest_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only (Linux)
    except (AttributeError, OSError):
        pass


def _set(slot: _Slot, value: torch.Tensor) -> None:
    table = slot.module._parameters if slot.is_param else slot.module._buffers
    table[slot.attr] = value


class StreamHook(ModelHook):
    """Brings a block's weights in before its forward and drops them after."""

    def __init__(self, streamer: WeightStreamer, name: str) -> None:
        self.streamer, self.name = streamer, name

    def pre_forward(self, module, *args, **kwargs):
        self.streamer.acquire(self.name)
        return args, kwargs

    def post_forward(self, module, output):
        self.streamer.release(self.name)
        return output


class StreamerBackend(Backend):
    name = "streamer"

    def load(self, request: LoadRequest) -> LoadedModel:
        plan = request.plan
        ckpt = open_checkpoint(request.checkpoint, request.ignore_keys)
        model = build_skeleton(request)
        modules = dict(model.named_modules())
        # a block that is a bare tensor (a root buffer, a parameter beside sub-blocks) has no
        # forward to hook: it stays resident (such tensors are tiny)
        streamed = [b for b in plan.blocks if b.placement.startswith("stream:") and not plan.cpu_only
                    and b.name in modules]
        streamed_names = [b.name for b in streamed]
        cuda = request.device.type == "cuda"
        by_block: dict[str, list[str]] = {}
        resident_cpu, resident_dev = [], []
        cpu_blocks = set(plan.cpu_modules()) if cuda else set()
        for name in ckpt.names():
            block = owner(name, streamed_names)
            if block is not None:
                by_block.setdefault(block, []).append(name)
            elif owner(name, cpu_blocks) is not None:
                resident_cpu.append(name)
            else:
                resident_dev.append(name)
        load_tensors(model, ckpt, resident_dev, request.device, request)
        load_tensors(model, ckpt, resident_cpu, "cpu", request)
        check_complete(model, ckpt, skip=streamed_names)
        _buffers_to(model, request.device, skip=cpu_blocks)

        disk_targets = {"stream:disk", "stream:nvme"}
        needs_disk = any(b.placement in disk_targets for b in streamed)
        store = disk_store_for(ckpt, by_block, request) if needs_disk else None
        blocks = []
        for b in streamed:
            names = by_block.get(b.name, [])
            blk = _Block(b.name, 0, from_disk=b.placement in disk_targets)
            for name in names:
                module, attr, is_param = split_name(model, name)
                current = (module._parameters if is_param else module._buffers)[attr]
                dtype = request.dtype_for(name, current)
                blk.slots[name] = _Slot(module, attr, is_param, current.to("meta", dtype))
                blk.nbytes += current.numel() * torch.empty((), dtype=dtype).element_size()
                if not blk.from_disk:
                    host = ckpt.read(name).to(dtype)
                    blk.host[name] = host.pin_memory() if cuda and plan.pin_memory else host
            for slot in blk.slots.values():
                _set(slot, slot.placeholder)
            blocks.append(blk)
        # A plan may offload only by computing blocks on the CPU: then nothing streams, and the
        # streamer is just the resident load plus the CPU-compute hooks below.
        stats = TransferStats()
        streamer = WeightStreamer(blocks, request.device, plan.prefetch, store, stats)
        for blk in blocks:
            add_hook_to_module(model.get_submodule(blk.name), StreamHook(streamer, blk.name))
        cpu_compute_hooks(model, plan, request.device)

        def close() -> None:
            streamer.close()
            for blk in blocks:
                remove_hook_from_module(model.get_submodule(blk.name))

        return LoadedModel(model, self.name, plan, request.device, stats, close,
                           details={"streamed_blocks": len(blocks), "prefetch": streamer.prefetch,
                                    "store": str(store.path) if store else "ram",
                                    "pinned": cuda and plan.pin_memory},
                           runtime_state=streamer)


def _buffers_to(model: nn.Module, device: torch.device, skip) -> None:
    """Constructor-made buffers (real since the skeleton) join the execution device."""
    for name, module in model.named_modules():
        if owner(name, skip) is not None:
            continue
        for key, buf in list(module._buffers.items()):
            if buf is not None and buf.device.type not in ("meta", device.type):
                module._buffers[key] = buf.to(device)
