"""N replicas of the server on Ray Serve (`edge-runtime serve --replicas N`, the `ray` extra).

  ingress.py        thin deployment: reads the body, routes by voice id, merges /metrics
  replica.py        model deployment: one Runtime and our FastAPI app per replica
  forwarding.py     a request played into the app and its answer streamed back
  metrics_board.py  every replica's Prometheus text, merged with a replica label
  app_builder.py    the Serve application from serve's options and the profile's replicas section
  launcher.py       the local (or joined) cluster, start-up lines and the SIGTERM drain

`build_app` is the import path for Ray's own CLI: `serve run edge_runtime.serving.replicas:build_app
model=... replicas=2`, or `serve deploy examples/ray_serve.yaml`.
"""

import os

# Ray 2.60 turns token auth on for ray.init() and phones home by default: a local cluster bound to
# 127.0.0.1 needs neither. Set before ray is first imported (below); the user's own values win.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from edge_runtime.serving.replicas.app_builder import build_app  # noqa: E402

__all__ = ["build_app"]
