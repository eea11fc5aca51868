"""`edge-runtime serve --replicas N`: the same server as N model replicas on Ray Serve.

Starts (or joins, --ray-address) a Ray cluster, starts Serve's HTTP proxy on --host/--port, deploys
the app (app_builder.py) and prints the lines the plain server prints. SIGTERM or Ctrl+C deletes the
app first, which lets in-flight requests finish (serve.shutdown / ray stop would drop them), then
shuts Serve and the local cluster down.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from pathlib import Path

import ray
from ray import serve

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.serving.replicas.app_builder import ReplicaArgs, build_app  # the package sets Ray's env first
from edge_runtime.serving.replicas.metrics_board import board_name


def _say(line: str) -> None:
    print(line, flush=True)


def _forwarded_env() -> dict[str, str]:
    """What replicas need from this shell on any node: plug-in families (EDGE_RUNTIME_FAMILIES and
    the PYTHONPATH that finds them), the API key and every other EDGE_RUNTIME_* setting."""
    return {k: v for k, v in os.environ.items() if k.startswith("EDGE_RUNTIME_") or k == "PYTHONPATH"}


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _absolute(value: str | None) -> str | None:
    """Replicas do not share this shell's working folder: local paths go absolute."""
    return str(Path(value).resolve()) if value and Path(value).exists() else value


def _overrides(overrides: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if key.strip() == "voice_cache.library_dir" and value and "://" not in value:
            item = f"{key}{sep}{Path(value).expanduser().resolve()}"
        out.append(item)
    return tuple(out)


def _args(args: argparse.Namespace, overrides: tuple[str, ...]) -> ReplicaArgs:
    return ReplicaArgs(model=_absolute(args.model), profile=_absolute(args.profile), set=_overrides(overrides),
                       replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                       api_key=args.api_key, max_upload_mib=args.max_upload_mib,
                       shutdown_timeout=args.shutdown_timeout, warm_up=not args.no_warm_up,
                       allow_download=args.allow_download)


def run(args: argparse.Namespace, overrides: tuple[str, ...]) -> int:
    if not 0 <= args.port <= 65535:
        raise EdgeRuntimeError(f"--port {args.port} is out of range; allowed: 0 to 65535")
    if args.replicas < 1:
        raise EdgeRuntimeError(f"--replicas {args.replicas}: give at least 1")
    if args.telemetry:
        raise EdgeRuntimeError("--telemetry writes one file per process; it is not available with --replicas")
    spec = _args(args, overrides)
    app = build_app(spec)  # resolves the profile: its errors surface here, before any cluster starts
    local = args.ray_address is None
    port = _free_port(args.host) if args.port == 0 else args.port
    # a local cluster's workers inherit this environment; naming it in a runtime_env would also make
    # Ray start fresh workers for it instead of using the ones it prestarted (seconds on 2 cores)
    ray.init(address=args.ray_address, include_dashboard=False if local else None,
             _node_ip_address="127.0.0.1" if local else None, namespace="serve",
             runtime_env=None if local else {"env_vars": _forwarded_env()}, log_to_driver=bool(args.verbose),
             logging_level="INFO" if args.verbose else "WARNING", configure_logging=True)
    stop = threading.Event()
    stopped_by: list[str] = []

    def on_signal(sig: int, frame: object) -> None:
        stopped_by.append(signal.Signals(sig).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": args.host, "port": port})
        try:
            serve.run(app, name=spec.name, route_prefix="/", blocking=False)
        except RuntimeError as exc:  # a replica failed to start: its traceback is in Serve's logs
            raise EdgeRuntimeError(f"{exc} (run with -v to see the replicas' logs here; Ray keeps them under "
                                   "/tmp/ray/session_latest/logs/serve)") from None
        first = serve.get_deployment_handle("ModelReplica", spec.name).describe.remote().result()
        for line in first["lines"]:
            _say(line)
        scaling = (f"{args.replicas} (autoscaling {args.min_replicas}..{args.max_replicas})"
                   if args.min_replicas is not None or args.max_replicas is not None else str(args.replicas))
        _say(f"replicas: {scaling} on Ray Serve ({'local cluster' if local else args.ray_address}), "
             f"routing {spec.routing or 'from the profile'}")
        _say(f"serving on http://{args.host}:{port} (OpenAI base_url http://{args.host}:{port}/v1)")
        while not stop.wait(0.5):
            pass
        serve.delete(spec.name)  # waits for in-flight requests (up to --shutdown-timeout)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop_cluster(spec.name, local)
    _say("stopped" + (f" ({stopped_by[0]}): in-flight requests finished" if stopped_by else ""))
    return 0


def _stop_cluster(app_name: str, local: bool) -> None:
    try:
        ray.kill(ray.get_actor(board_name(app_name), namespace="serve"))
    except Exception:  # never created, or gone with the cluster
        pass
    # Our app is deleted (drained) already. A joined cluster's Serve may run other apps, so it stays;
    # a local cluster goes down whole with ray.shutdown() (serve.shutdown() first only adds ~2.5 s)
    ray.shutdown()
    sys.stdout.flush()
