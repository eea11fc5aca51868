"""The one loader: profile, threads, device, dtype, model source, plan and backend resolved once, then
every sub-model of the family placed through the plan's backend.

    resolved = resolve("sesame/csm-1b", profile="8gb")   # no weights read: `edge-runtime plan` stops here
    rt = load("sesame/csm-1b", profile="8gb")             # the same resolution, then the weights
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_runtime.models.base import ModelSource, Placer, SubModel
from edge_runtime.policy.planner import CostModel, Plan, compute_budget, plan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resolution:
    """Everything decided before a weight is read."""

    profile: Any  # the resolved, validated Profile
    source: ModelSource
    device: str  # execution device: "cuda" or "cpu"
    dtype: Any  # the dtype policy's DtypeChoice for that device
    plan: Plan
    backend: str  # resident | accelerate | streamer | deepspeed
    dtype_note: str = ""  # what the plan assumed, and why (for `plan`)
    cost_model: CostModel | None = None  # the transfer rates the plan assumed
    cost_note: str = ""  # where they came from

    @property
    def torch_dtype(self) -> torch.dtype:
        from edge_runtime.policy.dtypes import torch_dtype

        return torch_dtype(self.dtype.dtype)


def plan_model(source: ModelSource, profile: Any, dtype: torch.dtype, cost_model: CostModel | None = None) -> Plan:
    """Place every sub-model of ``source`` under ``profile`` in one budget (planner.plan raises
    PlanError when nothing fits). Sizes come from config files on the meta device."""
    if cost_model is None:
        from edge_runtime.policy.bandwidth import cost_model_from_measurement

        cost_model = cost_model_from_measurement()[0]
    layout = source.family.layout(source, dtype, tuple(profile.precision.fp32_components))
    return plan(layout, profile, compute_budget(profile, layout), cost_model)


def resolve(model: str | None = None, *, profile: Any = None, overrides: tuple[str, ...] = (),
            allow_download: bool = False, weights: bool = True, cost_model: CostModel | None = None,
            for_tier: bool = False, dtype: str | None = None) -> Resolution:
    """Resolve ``model`` under ``profile`` (a name or path, or an already loaded Profile).
    ``weights=False`` needs config files only (planning before download). ``for_tier`` plans in
    the dtype of the profile's tier whatever this machine has (the `plan` command); otherwise in the
    dtype chosen for this machine's device. ``dtype`` ("bf16", "fp16", "fp32") overrides the dtype
    policy (emulated where the hardware lacks it: for experiments and tests, not for speed)."""
    from edge_runtime.models import registry
    from edge_runtime.policy.bandwidth import cost_model_from_measurement
    from edge_runtime.policy.dtypes import choose_device, planning_dtype, torch_dtype
    from edge_runtime.policy.planner.backend_choice import backend_for
    from edge_runtime.policy.profiles import load_profile
    from edge_runtime.policy.schema import Profile

    resolved = profile if isinstance(profile, Profile) else load_profile(profile, overrides)
    source = registry.resolve(model, allow_download=allow_download, weights=weights)
    device, choice = choose_device(resolved)
    if dtype is not None:
        from edge_runtime.policy.dtypes import DtypeChoice, dtype_name

        choice = DtypeChoice(dtype_name(dtype), f"{dtype} forced by the caller")
    if for_tier:
        plan_dtype, dtype_note = planning_dtype(resolved)
    else:
        plan_dtype, dtype_note = torch_dtype(choice.dtype), f"{choice.dtype} ({choice.reason})"
    if cost_model is None:
        cost_model, cost_note = cost_model_from_measurement()
    else:
        cost_note = (f"cost model: host->device {cost_model.h2d_bytes_per_s / 1e9:.1f} GB/s, "
                     f"disk read {cost_model.disk_bytes_per_s / 1e9:.1f} GB/s (given by the caller)")
    result = plan_model(source, resolved, plan_dtype, cost_model)
    return Resolution(resolved, source, device, choice, result, backend_for(resolved, result), dtype_note,
                      cost_model, cost_note)


class BackendPlacer(Placer):
    """Places each sub-model with the plan's backend on its share of the plan; keeps the handles."""

    def __init__(self, resolution: Resolution) -> None:
        self.plan = resolution.plan
        self.backend = resolution.backend
        self.device = torch.device(resolution.device)
        self.dtype = resolution.torch_dtype
        self.fp32_components = tuple(resolution.profile.precision.fp32_components)
        # on the CPU, a bandwidth-bound decoder may read bf16 weights while the rest computes in fp32
        wants_bf16 = resolution.profile.precision.cpu_decoder_dtype == "bf16"
        cpu_fp32 = self.device.type == "cpu" and self.dtype == torch.float32
        self.decoder_dtype = torch.bfloat16 if cpu_fp32 and wants_bf16 else self.dtype
        offload_dir = resolution.profile.offload.offload_dir
        self.offload_dir = Path(offload_dir).expanduser() if offload_dir else None
        self.handles: dict[str, Any] = {}  # sub-model name -> the backend's LoadedModel

    @property
    def offloaded(self) -> bool:
        return self.backend != "resident"

    def place(self, part: SubModel) -> nn.Module:
        from edge_runtime.runtime.backends import LoadRequest, load_model

        share = self.plan.for_submodel(part.name)
        # a sub-model the plan keeps whole on the execution device needs no offload machinery
        backend = self.backend if share.offloaded and not share.cpu_only else "resident"
        request = LoadRequest(build=part.build, checkpoint=Path(part.checkpoint), plan=share, device=self.device,
                              dtype=part.dtype or self.dtype, fp32_modules=part.fp32_modules,
                              offload_dir=self.offload_dir, no_split_modules=part.no_split_modules,
                              ignore_keys=part.ignore_keys)
        loaded = load_model(request, backend)
        self.handles[part.name] = loaded
        model = loaded.model.eval()
        for param in model.parameters():  # weights are constants: no autograd bookkeeping
            param.requires_grad_(False)
        return model


class Placement:
    """What the backends hold for one loaded model, all sub-models together."""

    def __init__(self, plan: Plan, backend: str, device: str, handles: dict[str, Any]) -> None:
        self.plan = plan
        self.backend = backend
        self.device = device
        self.handles = handles

    def end_request(self) -> None:
        for handle in self.handles.values():
            handle.end_request()

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()

    def describe(self) -> dict[str, Any]:
        """Backend, plan summary and transfer counters summed over sub-models (``bytes_moved``
        counts since load: subtract two readings for one request)."""
        main = self.handles.get("")
        out: dict[str, Any] = {"device": self.device, **(main.describe() if main is not None else {})}
        out["backend"] = self.backend  # the plan's backend, whichever a sub-model fell back to
        for key in ("bytes_moved", "loads", "waits_s"):
            out[key] = sum(h.stats.to_dict()[key] for h in self.handles.values())
        if len(self.handles) > 1:
            out["parts"] = {name or "model": h.describe() for name, h in self.handles.items()}
        plan = self.plan
        out.update(resident_bytes=plan.resident_bytes, streamed_bytes=plan.streamed_bytes, target=plan.target,
                   predicted_peak_vram_bytes=plan.peak_vram_bytes)
        return out


def load(model: str | None = None, *, profile: str | None = None, overrides: tuple[str, ...] = (),
         telemetry: str | None = None, allow_download: bool = False, dtype: str | None = None):
    """Resolve the profile, load ``model`` (default: the embedded Piper voice) and return a Runtime.
    ``dtype`` overrides the dtype policy (see resolve)."""
    from edge_runtime.runtime.engine import Runtime, configure_threads

    from edge_runtime.policy.profiles import load_profile

    profile_obj = load_profile(profile, overrides)
    configure_threads(profile_obj.runtime.threads)  # before loading: weight prepacking uses them
    if profile_obj.runtime.reuse_heap:
        from edge_runtime.runtime.memory import reuse_heap

        reuse_heap()  # process-wide and one-way: glibc keeps it for the life of the process
    resolution = resolve(model, profile=profile_obj, allow_download=allow_download, dtype=dtype)
    result = resolution.plan
    name = resolution.source.model_id
    if result.cpu_only:  # nothing to offload from: every block computes in RAM
        log.info("plan for %s: backend %s, all %d block(s) on the CPU", name, resolution.backend, len(result.blocks))
    else:
        log.info("plan for %s: backend %s, %d block(s) offloaded to %s", name, resolution.backend,
                 sum(b.placement != "gpu" for b in result.blocks), result.target)
    placer = BackendPlacer(resolution)
    speech_model = resolution.source.family.load(resolution.source, placer)
    placement = Placement(result, resolution.backend, resolution.device, placer.handles)

    def reload():  # idle unload (runtime.keep_alive_s): same source, profile and dtype, placed afresh
        again = BackendPlacer(resolution)
        model = resolution.source.family.load(resolution.source, again)
        return model, Placement(result, resolution.backend, resolution.device, again.handles)

    return Runtime(speech_model, profile_obj, telemetry_path=telemetry, device=resolution.device,
                   dtype=resolution.dtype, plan=result, placement=placement, reloader=reload)
