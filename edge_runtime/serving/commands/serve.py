"""`edge-runtime serve`: the OpenAI-compatible HTTP server (uvicorn) for one loaded model."""

from __future__ import annotations

import argparse
import signal
import sys

from edge_runtime.errors import EdgeRuntimeError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP speech server",
                              description="Serve one model over HTTP: POST /v1/audio/speech (OpenAI's API), "
                                          "voice uploads, /health and Prometheus /metrics. SIGTERM or Ctrl+C "
                                          "stops accepting, finishes in-flight requests and exits.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--model", help="model: piper:NAME, a Piper .onnx voice, or a transformers speech model "
                                    "(as for `say`; default: the embedded voice)")
    p.add_argument("--allow-download", action="store_true",
                   help="let a hub id missing from the local Hugging Face cache be downloaded")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* "
                                     "(default: $EDGE_RUNTIME_API_KEY; unset: no key)")
    p.add_argument("--max-upload-mib", type=float, default=10.0,
                   help="largest voice-prompt upload in MiB (default 10)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for in-flight requests before cancelling them (default 30)")
    p.add_argument("--no-warm-up", action="store_true",
                   help="skip the warm-up synthesis at start (max_batch auto then starts at 1 and learns while serving)")
    p.add_argument("--voice-library", metavar="URL",
                   help="where uploaded voices are kept, shared by every server that names it: a folder, an NFS "
                        "path or an fsspec URL such as s3://bucket/voices (default: the profile's "
                        "voice_cache.library_dir, else the user data folder)")
    p.add_argument("--telemetry", help="append per-request telemetry as JSON lines to this file")
    p.add_argument("--keep-alive", type=float, metavar="SECONDS",
                   help="unload the model after this many idle seconds, reload it on the next request "
                        "(0: never; default: the profile's runtime.keep_alive_s)")
    ray = p.add_argument_group("replicas on Ray Serve (pip install 'edge-runtime[ray]')")
    ray.add_argument("--replicas", type=int, metavar="N",
                     help="serve N replicas of the model behind one port on Ray Serve, requests for a voice "
                          "routed to the replica holding it (per-replica CPUs/GPU share: the profile's "
                          "replicas section)")
    ray.add_argument("--min-replicas", type=int, metavar="N",
                     help="autoscaling lower bound (default: the profile's replicas.min_replicas)")
    ray.add_argument("--max-replicas", type=int, metavar="N",
                     help="autoscaling upper bound (default: the profile's replicas.max_replicas)")
    ray.add_argument("--ray-address", metavar="ADDRESS",
                     help="join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting a local one")
    p.set_defaults(handler=run)
    return p


def _run_replicas(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise EdgeRuntimeError("--replicas needs the ray extra (ray is missing): pip install 'edge-runtime[ray]'")
    from edge_runtime.serving.replicas import launcher

    return launcher.run(args, server_overrides(args))


def _say(line: str) -> None:
    print(line, flush=True)


def _plan_summary(rt) -> str:
    placed = rt.placement
    dtype = getattr(rt.dtype, "dtype", None) or "fp32"
    if placed["backend"] == "resident" and "resident_bytes" not in placed:
        return f"plan: every weight resident on {placed['device']} ({dtype})"
    mib = 1024 * 1024
    peak = placed.get("predicted_peak_vram_bytes")
    return (f"plan: backend {placed['backend']} on {placed['device']} ({dtype}), "
            f"{placed['resident_bytes'] / mib:.0f} MiB resident, {placed['streamed_bytes'] / mib:.0f} MiB "
            f"streamed from {placed['target']}"
            + (f", predicted peak VRAM {peak / mib:.0f} MiB" if peak else ""))


def server_overrides(args: argparse.Namespace) -> tuple[str, ...]:
    """`--set` values plus what serve's own options override in the profile."""
    extra = []
    if args.keep_alive is not None:
        extra.append(f"runtime.keep_alive_s={args.keep_alive}")
    if args.voice_library:
        extra.append(f"voice_cache.library_dir={args.voice_library}")
    return (*(args.set or ()), *extra)


def run(args: argparse.Namespace) -> int:
    if args.replicas is not None or args.ray_address or args.min_replicas is not None \
            or args.max_replicas is not None:
        if args.replicas is None:
            raise EdgeRuntimeError("--min-replicas, --max-replicas and --ray-address go with --replicas N")
        return _run_replicas(args)
    try:
        import uvicorn

        from edge_runtime.serving.server import ServerSettings, create_app
    except ImportError as exc:
        raise EdgeRuntimeError(f"the server needs the server extra ({exc.name} is missing): "
                               "pip install 'edge-runtime[server]'") from None
    from edge_runtime.runtime.loader import load

    if not 0 <= args.port <= 65535:
        raise EdgeRuntimeError(f"--port {args.port} is out of range; allowed: 0 to 65535")
    rt = load(args.model, profile=args.profile, overrides=server_overrides(args),
              telemetry=args.telemetry, allow_download=args.allow_download)
    profile = rt.profile
    _say(f"profile: {profile.name} ({profile.source or 'built in'}): {profile.description}")
    _say(f"model: {rt.model.model_id} ({rt.sample_rate} Hz)")
    _say(_plan_summary(rt))
    try:  # a bad --voice-library fails here, with its reason, not on the first upload
        _say(f"voice library: {rt.voice_library().location}")
    except EdgeRuntimeError:
        rt.close()
        raise
    state = rt.model_state
    _say(f"keep-alive: unload after {state['keep_alive_s']:g} s idle" if state["keep_alive_s"]
         else "keep-alive: never unload")
    settings = ServerSettings(api_key=args.api_key, max_upload_bytes=int(args.max_upload_mib * 1024 * 1024),
                              shutdown_timeout_s=args.shutdown_timeout, warm_up=not args.no_warm_up,
                              announce=_say)
    _say("auth: API key required on /v1/*" if settings.key() else "auth: none (set --api-key or "
         "$EDGE_RUNTIME_API_KEY to require one)")
    app = create_app(rt, settings)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started:  # the real port, also when --port 0 picked one
                port = self.servers[0].sockets[0].getsockname()[1] if self.servers else args.port
                _say(f"serving on http://{args.host}:{port} (OpenAI base_url http://{args.host}:{port}/v1)")

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning",
                            access_log=bool(args.verbose), timeout_graceful_shutdown=args.shutdown_timeout,
                            lifespan="on")
    server = Server(config)
    stopped_by = []
    # uvicorn handles SIGTERM (graceful shutdown), then re-raises it under the handler it found:
    # this one records it, so the process ends through the code below with exit code 0
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: stopped_by.append(sig))
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        rt.close()
    if not server.started:
        print(f"error: could not serve on {args.host}:{args.port} (see the log above)", file=sys.stderr)
        return 2
    _say("stopped" + (" (SIGTERM): in-flight requests finished" if stopped_by else ""))
    return 0
