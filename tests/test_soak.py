"""Memory stays flat over hundreds of requests; the soak command writes its table and plot."""

from __future__ import annotations

import csv

import edge_runtime
from edge_runtime.serving import cli
from edge_runtime.serving.soak import SENTENCES, make_prompts

# The first words of each soak sentence: requests of different lengths, ~4x cheaper to synthesise
# than the whole sentences. What is tested is memory over many requests, not long texts.
SHORT_TEXTS = [" ".join(sentence.split()[:4]) for sentence in SENTENCES]


def test_300_requests_rss_flat_and_cache_bounded():
    rt = edge_runtime.load(profile="cpu", overrides=("voice_cache.max_entries=32",))
    try:
        prompts = make_prompts(rt, 300)  # a new voice prompt on every request
        cache = rt.voice_cache
        rss, most_entries = [], 0
        for i in range(300):
            audio, _ = rt.synthesize(SHORT_TEXTS[i % len(SHORT_TEXTS)], voice=prompts[i])
            assert len(audio) > 0
            stats = cache.stats()
            assert stats["entries"] <= stats["max_entries"] and stats["bytes"] <= stats["max_bytes"]
            most_entries = max(most_entries, stats["entries"])
            rss.append(rt.governor.snapshot().rss_bytes)
        assert most_entries == 32 and cache.stats()["evictions"] >= 300 - 32 - 1  # the bound was hit
        statuses = [t.voice_cache for t in rt.telemetry.recent(300)]
        assert statuses.count("miss") >= 268
        after_warmup = rss[20:]
        drift = (max(after_warmup) - after_warmup[0]) / after_warmup[0]
        assert drift <= 0.02, f"RSS grew {drift:.2%} after warm-up ({after_warmup[0]} -> {max(after_warmup)})"
    finally:
        rt.close()


def test_soak_command_writes_table_csv_and_plot(tmp_path, capsys):
    out = tmp_path / "soak"
    # in process; each configuration still runs in its own spawned process, as for a user
    code = cli.main(["soak", "-n", "3", "--configs", "baseline", "all", "--batch", "2", "--warmup", "1",
                     "-o", str(out)])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "| baseline |" in stdout and "| all |" in stdout
    rows = list(csv.DictReader((out / "soak.csv").open()))
    assert len(rows) == 6 and {r["config"] for r in rows} == {"baseline", "all"}
    assert all(float(r["latency_s"]) > 0 and float(r["rss_mib"]) > 0 for r in rows)
    md = (out / "soak.md").read_text()
    assert "## Per request" in md and md.count("\n| 3 |") == 1
    assert (out / "soak.png").stat().st_size > 10_000
