"""Soak results -> per-request CSV and Markdown, a summary table, and a PNG of memory and latency."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from edge_runtime.serving.soak import SoakResult, as_rows


def _memory_key(results: list[SoakResult]) -> tuple[str, str]:
    on_cuda = any(s.cuda_allocated_mib is not None for r in results for s in r.samples)
    return ("cuda_allocated_mib", "CUDA allocated (MiB)") if on_cuda else ("rss_mib", "process RSS (MiB)")


def summary_markdown(results: list[SoakResult], warmup: int) -> str:
    lines = ["| config | settings | requests | first ms | median ms | p95 ms | last-20 median ms | "
             f"RSS after warm-up {warmup} MiB | RSS end MiB | RSS drift % | RSS max MiB | cache entries | cache MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r.summary(warmup)
        cfg = r.settings
        settings = (f"{'inference' if cfg['inference_mode'] else 'grad'}/{cfg['dtype']}, cleanup {cfg['cleanup']}, "
                    f"batch {cfg['batch']}, cache<= {cfg['cache_max_entries']}")
        lines.append(f"| {r.config} | {settings} | {s['requests']} | {s['first_ms']:.1f} | {s['median_ms']:.1f} | "
                     f"{s['p95_ms']:.1f} | {s['last20_median_ms']:.1f} | {s['rss_start_mib']:.1f} | "
                     f"{s['rss_end_mib']:.1f} | {s['rss_drift_pct']:+.2f} | {s['rss_max_mib']:.1f} | "
                     f"{s['cache_entries']} | {s['cache_mib']:.3f} |")
    notes = [f"- {r.config}: {r.stopped}" for r in results if r.stopped]
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def per_request_markdown(results: list[SoakResult]) -> str:
    key, label = _memory_key(results)
    head = ["request"] + [f"{r.config} ms" for r in results] + [f"{r.config} {label.split(' (')[0]}" for r in results]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i in range(max(len(r.samples) for r in results)):
        lat = [f"{r.samples[i].latency_s * 1000:.1f}" if i < len(r.samples) else "" for r in results]
        mem = [f"{getattr(r.samples[i], key):.1f}" if i < len(r.samples) else "" for r in results]
        lines.append("| " + " | ".join([str(i + 1), *lat, *mem]) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[SoakResult], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    key, label = _memory_key(results)
    fig, (mem_ax, lat_ax) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    for r in results:
        xs = [s.index + 1 for s in r.samples]
        mem_ax.plot(xs, [getattr(s, key) for s in r.samples], label=r.config)
        lat_ax.plot(xs, [s.latency_s * 1000 for s in r.samples], label=r.config, linewidth=0.8)
    mem_ax.set_ylabel(label)
    mem_ax.set_title("edge-runtime soak: memory and latency per request")
    lat_ax.set_ylabel("latency per request (ms)")
    lat_ax.set_xlabel("request")
    lat_ax.set_yscale("log")
    for ax in (mem_ax, lat_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: list[SoakResult], out_dir: Path, warmup: int, meta: dict) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = as_rows(results)
    paths = {"csv": out_dir / "soak.csv", "markdown": out_dir / "soak.md", "json": out_dir / "soak.json",
             "plot": out_dir / "soak.png"}
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = summary_markdown(results, warmup)
    paths["markdown"].write_text(f"# edge-runtime soak\n\n{json.dumps(meta)}\n\n## Summary\n\n{summary}\n"
                                 f"## Per request\n\n{per_request_markdown(results)}")
    paths["json"].write_text(json.dumps({"meta": meta, "summary": [r.summary(warmup) for r in results],
                                         "settings": {r.config: r.settings for r in results}}, indent=2))
    if plot(results, paths["plot"]) is None:
        paths.pop("plot")
    return paths
