"""Smoke test of `benchmarks/shared_prefix_memory.py` on a tiny model: the GRPO
value-and-gradient compiles and runs, and the attention-only timing runs both layouts."""
from __future__ import annotations

import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import shared_prefix_memory  # noqa: E402


def test_reports_temporaries_and_times(capsys):
    shared_prefix_memory.main(["--hidden", "32", "--heads", "2", "--kv-heads", "1", "--head-dim", "16", "--mlp", "48",
                               "--vocab", "64", "--layers", "1", "--prompt", "12", "--responses", "3", "--length", "4",
                               "--block", "4", "--repeat", "1"])
    report = json.loads(capsys.readouterr().out)
    assert report["prefix_copy_bytes_all_layers"] == 1 * 2 * 3 * 1 * 16 * 12 * 4
    assert 0 < report["forward_temp_bytes"] and 0 < report["value_and_grad_temp_bytes"]
    assert report["median_seconds"] > 0 and len(report["seconds"]) == 1
    timings = shared_prefix_memory.time_attention(1, num=2, time_=4, slots=8, head_dim=8, block=4)
    assert set(timings) == {"copying_median_ms", "copy_free_median_ms"} and min(timings.values()) > 0
