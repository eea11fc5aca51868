"""The Serve application: the ingress in front of N model replicas, sized from the profile's
`replicas` section. `edge-runtime serve --replicas N` builds it through `launcher`; Ray's own CLI
takes it too:

    serve run edge_runtime.serving.replicas:build_app model=piper:en_US-lessac-medium replicas=2
    serve deploy examples/ray_serve.yaml
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from ray import serve
from ray.serve import Application

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.serving.replicas.ingress import Ingress
from edge_runtime.serving.replicas.replica import ModelReplica

APP_NAME = "edge_runtime"
INGRESS_MAX_ONGOING = 1024  # the ingress only waits on replicas: it must never be the bottleneck
DRAIN_POLL_S = 0.5  # how often a stopping replica checks for in-flight requests (Serve's default: 2 s)
# how often the controller checks its replicas: a killed one is replaced after this (Serve's default: 10 s);
# the check itself is a no-op call to the replica
HEALTH_CHECK_S = 2.0


@dataclass
class ReplicaArgs:
    """What `build_app` takes: serve's options, as a dict (Serve config `args`, `serve run k=v`)."""

    model: str | None = None
    profile: str | None = None
    set: tuple[str, ...] = ()  # profile overrides, as `--set`
    replicas: int = 1
    min_replicas: int | None = None  # None: the profile's replicas.min_replicas
    max_replicas: int | None = None
    routing: str | None = None  # None: the profile's replicas.routing
    api_key: str | None = None
    max_upload_mib: float = 10.0
    shutdown_timeout: float = 30.0
    warm_up: bool = True
    allow_download: bool = False
    name: str = APP_NAME  # what the launcher deploys it as (a Serve config names it itself)

    @classmethod
    def from_dict(cls, args: dict[str, Any]) -> ReplicaArgs:
        known = {f.name: f.default for f in fields(cls)}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise EdgeRuntimeError(f"unknown build_app argument(s) {', '.join(unknown)}; allowed: {', '.join(known)}")
        made = cls(**{name: _coerce(name, value, known[name]) for name, value in args.items()})
        if made.routing not in (None, "voice", "default"):
            raise EdgeRuntimeError(f"routing {made.routing!r}: allowed: voice or default")
        return made


def _coerce(name: str, value: Any, default: Any) -> Any:
    """`serve run k=v` passes strings: read them as the field's type."""
    if name == "set":
        return tuple(value) if isinstance(value, (list, tuple)) else (value,) if value else ()
    if not isinstance(value, str):
        return value
    if isinstance(default, bool):
        return value.lower() in ("1", "true", "yes", "on")
    if name in ("replicas", "min_replicas", "max_replicas"):
        return int(value)
    if isinstance(default, float):
        return float(value)
    return value


def _replica_overrides(a: ReplicaArgs, profile: Any, memory_fraction: float | None) -> tuple[str, ...]:
    """The user's overrides plus what a replica's share of the machine implies."""
    extra = []
    if profile.runtime.threads == 0:  # "every core" is every core of the box, shared by all replicas
        extra.append(f"runtime.threads={max(1, math.ceil(profile.replicas.num_cpus))}")
    if memory_fraction is not None and memory_fraction < 1 and profile.memory.vram_gib:
        # the planner fits the model into this replica's part of the card
        extra.append(f"memory.vram_gib={profile.memory.vram_gib * memory_fraction:.3f}")
    return (*a.set, *extra)


def _scaling(a: ReplicaArgs, section: Any) -> dict[str, Any]:
    low = a.min_replicas if a.min_replicas is not None else section.min_replicas
    high = a.max_replicas if a.max_replicas is not None else section.max_replicas
    if low is None and high is None:
        return {"num_replicas": a.replicas}
    low = a.replicas if low is None else low
    high = max(a.replicas, low) if high is None else high
    if not low <= a.replicas <= high:
        raise EdgeRuntimeError(f"--replicas {a.replicas} must lie within the autoscaling bounds "
                               f"{low}..{high} (--min-replicas/--max-replicas or the profile's replicas section)")
    return {"autoscaling_config": {"min_replicas": low, "max_replicas": high, "initial_replicas": a.replicas,
                                   "target_ongoing_requests": section.target_ongoing_requests}}


def build_app(args: dict[str, Any]) -> Application:
    from edge_runtime.policy.profiles import load_profile

    a = args if isinstance(args, ReplicaArgs) else ReplicaArgs.from_dict(dict(args))
    profile = load_profile(a.profile, a.set)
    section = profile.replicas
    fraction = section.memory_fraction if section.memory_fraction is not None else (section.num_gpus or None)
    max_upload = int(a.max_upload_mib * 1024 * 1024)
    settings = {"api_key": a.api_key, "max_upload_bytes": max_upload, "shutdown_timeout_s": a.shutdown_timeout,
                "warm_up": a.warm_up}
    replica = serve.deployment(ModelReplica).options(
        name="ModelReplica", ray_actor_options={"num_cpus": section.num_cpus, "num_gpus": section.num_gpus},
        max_ongoing_requests=section.max_ongoing_requests, graceful_shutdown_timeout_s=a.shutdown_timeout,
        graceful_shutdown_wait_loop_s=DRAIN_POLL_S, health_check_period_s=HEALTH_CHECK_S,
        **_scaling(a, section))
    ingress = serve.deployment(Ingress).options(
        name="Ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=INGRESS_MAX_ONGOING,
        graceful_shutdown_timeout_s=a.shutdown_timeout + 5, graceful_shutdown_wait_loop_s=DRAIN_POLL_S)
    # replicas on other nodes may not see this machine's profile file; a built-in name they all have
    profile_arg = a.profile or profile.name
    models = replica.bind(a.model, profile_arg, _replica_overrides(a, profile, fraction), a.allow_download, settings,
                          fraction)
    return ingress.bind(models, a.routing or section.routing, max_upload + 1024 * 1024)
