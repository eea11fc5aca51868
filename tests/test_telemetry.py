"""Telemetry: JSONL file, bounded in-memory window, summary numbers."""

from __future__ import annotations

import json
import threading

import pytest

from edge_runtime.runtime.telemetry import RequestTelemetry, TelemetryLog


def make(i: int, **overrides) -> RequestTelemetry:
    fields = dict(request_id=f"r{i}", model="piper:test", latency_s=float(i), audio_seconds=2.0,
                  rtf=i / 2.0, time_to_first_audio_s=0.1, batch_size=1, voice_cache="none",
                  rss_bytes=1000 + i, cleaned=i % 2 == 0)
    fields.update(overrides)
    return RequestTelemetry(**fields)


def test_jsonl_written_line_by_line_and_parseable(tmp_path):
    path = tmp_path / "sub" / "telemetry.jsonl"
    log = TelemetryLog(path)
    log.record(make(1))
    # line-buffered: the line is on disk before close
    first = path.read_text().splitlines()
    assert len(first) == 1 and json.loads(first[0])["request_id"] == "r1"
    log.record(make(2, error="RequestFailedError: out of memory", rtf=float("nan")))
    log.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["request_id"] for r in rows] == ["r1", "r2"]
    assert rows[1]["error"].startswith("RequestFailedError") and rows[1]["rtf"] is None  # NaN -> null
    assert rows[0]["cuda_peak"] is None and rows[0]["rss_bytes"] == 1001
    assert set(rows[0]) == set(RequestTelemetry.__dataclass_fields__)
    assert isinstance(rows[0]["timestamp"], float)


def test_file_is_appended_across_logs(tmp_path):
    path = tmp_path / "t.jsonl"
    with TelemetryLog(path) as log:
        log.record(make(1))
    with TelemetryLog(path) as log:
        log.record(make(2))
    assert len(path.read_text().splitlines()) == 2


def test_window_is_bounded():
    log = TelemetryLog(keep_last=50)
    for i in range(5000):
        log.record(make(i))
    assert len(log) == 50
    assert [r.request_id for r in log.recent()][:2] == ["r4950", "r4951"]
    assert log.last().request_id == "r4999"
    assert [r.request_id for r in log.recent(2)] == ["r4998", "r4999"]
    summary = log.summary()
    assert summary["requests"] == 5000 and summary["window"] == 50


def test_summary_numbers():
    log = TelemetryLog()
    assert log.summary()["latency_p50_s"] is None and log.last() is None
    for i in range(1, 101):  # latencies 1..100 s, rtf = latency / 2
        log.record(make(i, voice_cache="hit" if i <= 30 else "miss"))
    log.record(make(999, error="boom", latency_s=0.001, rtf=None))
    s = log.summary()
    assert s["requests"] == 101 and s["errors"] == 1 and s["window_errors"] == 1
    assert s["latency_p50_s"] == pytest.approx(50.5)  # the failure is not timed
    assert s["latency_p95_s"] == pytest.approx(95.05)
    assert s["rtf_mean"] == pytest.approx(25.25)
    assert s["audio_seconds"] == pytest.approx(200.0)
    assert s["voice_cache"] == {"hit": 30, "miss": 70, "library": 0, "none": 1}
    assert s["cleaned"] == 50


def test_concurrent_writers_produce_whole_lines(tmp_path):
    path = tmp_path / "t.jsonl"
    log = TelemetryLog(path, keep_last=10)

    def writer(t: int) -> None:
        for i in range(200):
            log.record(make(i, request_id=f"t{t}-{i}", error="x" * 500))

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    log.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 800 and len({r["request_id"] for r in rows}) == 800
    assert len(log) == 10


def test_record_after_close_keeps_memory_window(tmp_path):
    log = TelemetryLog(tmp_path / "t.jsonl")
    log.close()
    log.record(make(1))
    assert log.last().request_id == "r1"


def test_keep_last_must_be_positive():
    with pytest.raises(ValueError):
        TelemetryLog(keep_last=0)
