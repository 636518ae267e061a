"""Smoke test of `benchmarks/grpo_update.py` on short sequences: both settings of
`prompt_once` run the same update (the script asserts equal losses and gradients), the shared
prompt avoids FLOPs, and the section renders with its per-round spread."""
from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import grpo_update  # noqa: E402


def test_both_settings_give_the_same_update(monkeypatch):
    monkeypatch.setattr(grpo_update, "PROMPT", 24)
    monkeypatch.setattr(grpo_update, "RESPONSE", 8)
    monkeypatch.setattr(grpo_update, "MODEL", dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                                                   intermediate_size=48))
    result = grpo_update.run(num_prompts=2, repeats=2)
    assert result["max_param_difference"] < 1e-5
    assert abs(result["loss"]["shared"] - result["loss"]["per_response"]) <= 1e-5
    # (G - 1) of every G prompt passes are avoided: most of a prompt-dominated update's FLOPs
    assert 0.5 < result["flops_avoided"] < 1
    low, middle, high = result["round_speedups"]
    assert 0 < low <= middle <= high
    text = grpo_update.report(result, "python benchmarks/grpo_update.py --prompts 2 --repeats 2")
    assert text.startswith(grpo_update.SECTION) and "per round, min / median / max" in text
    assert "| each group's prompt once (`prompt_once=True`) |" in text
