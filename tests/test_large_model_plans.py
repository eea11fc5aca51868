"""The published Higgs Audio V2 and VibeVoice shapes, planned from config-only folders exactly as
`edge-runtime plan` does (scripts/plan_large_models.py): what fits which card, and at what precision."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import plan_large_models  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return plan_large_models.write_folders(tmp_path_factory.mktemp("published"))


def row(folders, model, tier):
    return plan_large_models.plan_row(model, folders[model], tier)


def test_higgs_fits_8gb_in_bf16_with_prefill_only_blocks_off_the_gpu(folders):
    r = row(folders, "higgs-audio-v2-3b", "8gb")
    assert r["fits"] and r["int8_blocks"] == r["int4_blocks"] == 0 and r["dtype"] == "bf16"
    assert r["total_gib"] > 9.5  # the whole model is 10 GiB in bf16: it cannot all be resident
    assert r["off_gpu_once_gib"] >= 3.5  # text FFNs and text embedding: prefill only, streamed or on the CPU
    assert r["extra_ms_per_frame"] == 0.0 and r["peak_vram_gib"] <= r["usable_gib"]


def test_higgs_fits_6gb_with_int8_only(folders):
    r = row(folders, "higgs-audio-v2-3b", "6gb")
    assert r["fits"] and r["int8_blocks"] > 0 and r["int4_blocks"] == 0
    assert r["predicted_error"] <= 0.02 and r["extra_ms_per_frame"] == 0.0


def test_vibevoice_1_5b_fits_6gb_in_bf16(folders):
    r = row(folders, "vibevoice-1.5b", "6gb")
    assert r["fits"] and r["int8_blocks"] == r["int4_blocks"] == 0 and r["dtype"] == "bf16"
    assert r["total_gib"] > 4.5 and r["extra_ms_per_frame"] == 0.0


def test_vibevoice_large_fits_12gb_with_int8_and_8gb_with_int4(folders):
    twelve = row(folders, "vibevoice-large", "12gb")
    assert twelve["fits"] and twelve["int8_blocks"] > 0 and twelve["int4_blocks"] == 0
    eight = row(folders, "vibevoice-large", "8gb")
    assert eight["fits"] and eight["int4_blocks"] > 0
    assert row(folders, "vibevoice-large", "24gb")["total_gib"] > 16 > 9 > eight["total_gib"]  # 17.4 GiB in bf16


def test_vibevoice_large_at_6gb_names_what_a_fit_needs(folders):
    r = row(folders, "vibevoice-large", "6gb")
    assert not r["fits"] and r["int4_blocks"] > 0  # the most compressed plan still runs (slowly)
    note = next(n for n in r["notes"] if n.startswith("does not fit 6.0 GiB"))
    need = float(note.split("need about ")[1].split(" GiB")[0])
    assert 6.0 < need < 8.5 and r["extra_ms_per_frame"] > 0


def test_every_tier_row_prints(folders, capsys):
    rows = [row(folders, m, t) for m in folders for t in plan_large_models.TIERS]
    text = plan_large_models.table(rows)
    assert len(text.splitlines()) == 2 + len(rows) and not any("error" in r for r in rows)
