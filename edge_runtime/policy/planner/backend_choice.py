"""Which backend executes a plan: the profile's `offload.backend`, with `auto` and `none` resolved."""

from __future__ import annotations

from typing import Any

from edge_runtime.policy.planner.plan import Plan


def auto_backend(plan: Plan) -> str:
    """What ``auto`` means for this plan: resident when nothing is offloaded, deepspeed for an nvme
    target, else the prefetching streamer."""
    if not plan.offloaded or plan.cpu_only:
        return "resident"
    if plan.backend == "deepspeed" or plan.target == "nvme":
        return "deepspeed"
    return "streamer"


def backend_for(profile: Any, plan: Plan) -> str:
    """The backend that executes ``plan`` under ``profile``."""
    wanted = profile.offload.backend
    if wanted == "none" or not plan.offloaded or plan.cpu_only:
        return "resident"
    return auto_backend(plan) if wanted == "auto" else wanted
