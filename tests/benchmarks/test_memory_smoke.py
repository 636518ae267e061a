"""Smoke test of `benchmarks/memory.py` on a tiny model: every step compiles and runs with both
heads (and with LoRA), the two heads give the same loss, the step's own peak resident memory is
recorded, and the table and growth lines render."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import memory  # noqa: E402


def finished(result: dict) -> dict:
    """What `run_in_child` returns: the child's counters in GB (its ru_maxrss faked here)."""
    result["process_peak_kb"] = max(result["step_peak_kb"], 1)
    return memory.with_gb(result)


def test_every_step_runs_with_both_heads(monkeypatch):
    tiny = dict(vocab_size=512, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    monkeypatch.setitem(memory.MODELS, "probe", tiny)
    results = []
    for tokens in (64, 128):
        for step in memory.STEPS:
            pair = [finished(memory.run_case(step, head, "probe", tokens, execute_limit_gb=1.0))
                    for head in memory.HEADS]
            for result in pair:
                assert result["executed"] and result["xla_estimate_gb"] > 0
                assert result["step_peak_gb"] >= result["baseline_gb"] > 0
                result["tokens"] = 1024 if tokens == 64 else 4096
            np.testing.assert_allclose(pair[0]["loss"], pair[1]["loss"], rtol=1e-5, atol=1e-6)
            results += pair
    assert "| probe | sft | 1024 | full | full | auto |" in memory.table(results)
    assert len(memory.growth_lines(results)) == 2 * len(memory.STEPS) * len(memory.HEADS)


def test_lora_cases_run(monkeypatch):
    tiny = dict(vocab_size=256, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    monkeypatch.setitem(memory.MODELS, "probe", tiny)
    for step in ("sft", "dpo"):
        full = memory.run_case(step, "chunked", "probe", 64, execute_limit_gb=1.0)
        lora = memory.run_case(step, "chunked", "probe", 64, execute_limit_gb=1.0, finetune="lora")
        assert lora["executed"] and np.isfinite(lora["loss"])
        assert lora["arguments_gb"] < full["arguments_gb"]  # no optimizer state for the base
