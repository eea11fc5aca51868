"""One scrape for every replica: each replica pushes its Prometheus text to a small named actor
(about once a second, and once more when it stops); the ingress's /metrics merges what the board
holds, each sample labelled `replica="<id>"`.

A scrape that lands on one replica's own /metrics would show that replica only; Ray's metrics
export would need a Prometheus pointed at every node. A replica not heard from for STALE_S (killed,
scaled down) drops out of the merge.
"""

from __future__ import annotations

import time

import ray
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

STALE_S = 10.0
PUSH_EVERY_S = 1.0


def board_name(app_name: str) -> str:
    return f"edge_runtime_metrics:{app_name}"


@ray.remote(num_cpus=0)
class MetricsBoard:
    def __init__(self) -> None:
        self.texts: dict[str, tuple[float, str]] = {}

    def push(self, replica: str, text: str) -> None:
        self.texts[replica] = (time.monotonic(), text)

    def fresh(self) -> dict[str, str]:
        now = time.monotonic()
        self.texts = {r: (t, text) for r, (t, text) in self.texts.items() if now - t <= STALE_S}
        return {r: text for r, (_, text) in self.texts.items()}


def board(app_name: str):
    """The app's board, created by whichever replica or ingress asks first. Detached, so it outlives
    the replica that created it (replicas come and go); `launcher` kills it with the app."""
    return MetricsBoard.options(name=board_name(app_name), get_if_exists=True, lifetime="detached").remote()


class _Merged:
    def __init__(self, texts: dict[str, str]) -> None:
        self.texts = texts

    def collect(self):
        families: dict[str, Metric] = {}
        for replica, text in sorted(self.texts.items()):
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:  # HELP and TYPE once per family, whatever the number of replicas
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type,
                                                            family.unit)
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "replica": replica}, sample.value,
                                      sample.timestamp)
        return list(families.values())


def merge(texts: dict[str, str]) -> bytes:
    """Prometheus text of every replica's samples, labelled by replica."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(texts))
    return generate_latest(registry)
