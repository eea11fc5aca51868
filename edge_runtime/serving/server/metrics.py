"""Prometheus metrics, one registry per app (two apps in one process never share counters).

Request-side figures are observed by the routes and the scheduler's batch hook; the runtime's own
counters (voice cache, memory) are read at scrape time by a collector, so they are never stale
and cost nothing between scrapes.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from edge_runtime.runtime.idle import STATES
from edge_runtime.runtime.memory import peak_rss_bytes

PREFIX = "edge_runtime"
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


class RuntimeCollector:
    """Voice cache counters and memory, read from the runtime at each scrape."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime

    def describe(self) -> list:
        return []  # collected lazily; nothing to check at registration

    def collect(self):
        stats = self.runtime.voice_cache.stats()
        for name, help_text in (("hits", "prepared-voice lookups served from the cache"),
                                ("misses", "prepared-voice lookups not in the cache (read from the library or "
                                            "prepared)"),
                                ("evictions", "voices dropped to keep the cache within its limits")):
            yield CounterMetricFamily(f"{PREFIX}_voice_cache_{name}", f"Voice cache: {help_text}.",
                                      value=stats[name])
        for name, key, help_text in (("bytes", "bytes", "bytes held by cached voices"),
                                     ("entries", "entries", "voices cached"),
                                     ("max_bytes", "max_bytes", "byte limit (voice_cache.max_mib)"),
                                     ("max_entries", "max_entries", "entry limit (voice_cache.max_entries)")):
            yield GaugeMetricFamily(f"{PREFIX}_voice_cache_{name}", f"Voice cache: {help_text}.",
                                    value=stats[key])
        voices = getattr(self.runtime, "voices", None)  # serving fakes have no resolver
        if voices is not None:
            yield CounterMetricFamily(f"{PREFIX}_voice_library_rebuilds", "Damaged voice-library entries "
                                      "prepared again from their source.", value=voices.rebuilt)
        yield from self._model_state()
        snap = self.runtime.governor.snapshot()
        yield GaugeMetricFamily(f"{PREFIX}_memory_rss_bytes", "Resident set size of the server process.",
                                value=snap.rss_bytes)
        yield GaugeMetricFamily(f"{PREFIX}_memory_rss_peak_bytes", "Highest RSS of the process so far.",
                                value=peak_rss_bytes())
        if snap.cuda_allocated is not None:
            last = self.runtime.last_telemetry
            for name, value, help_text in (
                    ("allocated", snap.cuda_allocated, "CUDA memory held by tensors now"),
                    ("reserved", snap.cuda_reserved, "CUDA memory reserved by the caching allocator now"),
                    ("peak", last.cuda_peak if last and last.cuda_peak is not None else snap.cuda_peak,
                     "peak CUDA memory allocated during the last request")):
                yield GaugeMetricFamily(f"{PREFIX}_cuda_memory_{name}_bytes", f"{help_text}.", value=value)

    def _model_state(self):
        """Idle unload (runtime.keep_alive_s): the model's state, and unload / reload durations."""
        described = getattr(self.runtime, "model_state", None)
        if described is None:
            return
        state = GaugeMetricFamily(f"{PREFIX}_model_state",
                                  "1 for the model's current state (loaded, unloading, unloaded, loading).",
                                  labels=["state"])
        for name in STATES:
            state.add_metric([name], 1.0 if described["state"] == name else 0.0)
        yield state
        yield GaugeMetricFamily(f"{PREFIX}_model_keep_alive_seconds",
                                "Idle seconds before the model is unloaded (0: never).", value=described["keep_alive_s"])
        for what in ("unload", "reload"):
            yield CounterMetricFamily(f"{PREFIX}_model_{what}s", f"Idle unload: times the model was {what}ed.",
                                      value=described[f"{what}s"])
            yield CounterMetricFamily(f"{PREFIX}_model_{what}_seconds", f"Idle unload: seconds spent in {what}s.",
                                      value=described[f"{what}_seconds_total"])
            last = described[f"last_{what}_s"]
            if last is not None:
                yield GaugeMetricFamily(f"{PREFIX}_model_last_{what}_seconds",
                                        f"Idle unload: duration of the last {what}.", value=last)


class ServerMetrics:
    def __init__(self, runtime: Any) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_http_requests", "HTTP requests answered, by route and status.",
                                ["route", "status"], registry=registry)
        self.latency = Histogram(f"{PREFIX}_request_latency_seconds",
                                 "Speech requests: arrival to last byte (queueing included).",
                                 ["stream"], buckets=LATENCY_BUCKETS, registry=registry)
        self.ttfa = Histogram(f"{PREFIX}_time_to_first_audio_seconds",
                              "Speech requests: arrival to the first audio ready to send.",
                              ["stream"], buckets=LATENCY_BUCKETS, registry=registry)
        self.rtf = Histogram(f"{PREFIX}_real_time_factor",
                             "Synthesis seconds per audio second (batch compute / audio; < 1 is faster "
                             "than real time).", buckets=RTF_BUCKETS, registry=registry)
        self.audio_seconds = Counter(f"{PREFIX}_audio_seconds", "Seconds of audio produced.", registry=registry)
        self.batch_size = Histogram(f"{PREFIX}_batch_size", "Requests per forward batch.",
                                    buckets=BATCH_BUCKETS, registry=registry)
        self.batch_seconds = Histogram(f"{PREFIX}_batch_seconds", "Worker seconds per batch.",
                                       buckets=LATENCY_BUCKETS, registry=registry)
        self.rejected = Counter(f"{PREFIX}_rejected_requests",
                                "Speech requests not served: queue_full, timeout, disconnected, shutting_down.",
                                ["reason"], registry=registry)
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "Requests waiting for the worker.", registry=registry)
        self.in_flight = Gauge(f"{PREFIX}_in_flight_requests", "Requests on the worker now.", registry=registry)
        self.max_batch = Gauge(f"{PREFIX}_max_batch", "Batch size the scheduler gathers up to.",
                               registry=registry)
        self.batch_curve = Gauge(f"{PREFIX}_batch_throughput_requests_per_second",
                                 "max_batch auto: requests/s measured at warm-up per batch size.",
                                 ["batch_size"], registry=registry)
        self.batch_curve_online = Gauge(f"{PREFIX}_batch_throughput_online_requests_per_second",
                                        "max_batch auto: requests/s per batch size measured while serving "
                                        "(moving average; requests of the calibration text's length).",
                                        ["batch_size"], registry=registry)
        self._tuner: Any = None
        registry.register(RuntimeCollector(runtime))

    def watch_scheduler(self, scheduler: Any, tuner: Any) -> None:
        """Queue figures are read from the scheduler at scrape time; the start-up curve once."""
        self.queue_depth.set_function(lambda: scheduler.depth)
        self.in_flight.set_function(lambda: scheduler.running)
        self.max_batch.set_function(lambda: tuner.current)  # auto refines it while serving
        for size, rps in tuner.startup_curve.items():
            self.batch_curve.labels(batch_size=str(size)).set(rps)
        self._tuner = tuner

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        if self._tuner is not None:
            for batch_size, rps in self._tuner.online_curve.items():
                self.batch_curve_online.labels(batch_size=str(batch_size)).set(rps)

    def observe_speech(self, *, stream: bool, latency_s: float, ttfa_s: float | None, audio_s: float,
                       compute_s: float | None) -> None:
        label = "true" if stream else "false"
        self.latency.labels(stream=label).observe(latency_s)
        if ttfa_s is not None:
            self.ttfa.labels(stream=label).observe(ttfa_s)
        self.audio_seconds.inc(audio_s)
        if compute_s is not None and audio_s > 0:
            self.rtf.observe(compute_s / audio_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestCounter:
    """ASGI middleware: counts answers by route template (not raw path: ids would explode the label
    set) and status."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def record(message: Any) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(route=route, status=str(status["code"])).inc()
