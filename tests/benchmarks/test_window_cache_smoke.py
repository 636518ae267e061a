"""Smoke test of `benchmarks/window_cache.py` on small shapes: the family table and the decode
step run, window slots are smaller than full slots, and the two caches give the same logits."""
from __future__ import annotations

import re
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import window_cache  # noqa: E402


def test_window_slots_are_smaller_and_agree(capsys):
    window_cache.main(["--step-batch", "2",
                       "--step-length", "64", "--step-window", "16", "--repeats", "1"])
    out = capsys.readouterr().out
    gemma = re.search(r"\| Gemma 3 1B \| 22 of 26 \| 512 \| ([\d.]+) \| ([\d.]+) \|", out)
    assert gemma and float(gemma.group(1)) > 3 * float(gemma.group(2))
    difference = float(re.search(r"largest logit difference between the two caches: ([\d.e+-]+)", out).group(1))
    assert difference < 1e-4
    full, window = (float(re.search(rf"\| {name} \| ([\d.]+) \|", out).group(1)) for name in ("full slots", "window slots"))
    assert window < full
