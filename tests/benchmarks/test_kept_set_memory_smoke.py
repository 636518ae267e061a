"""Smoke test of `benchmarks/kept_set_memory.py` on a tiny model: the three programs compile,
`policy_logprobs` is the blocked program, and its temporaries are below the full-logits one's."""
from __future__ import annotations

import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import kept_set_memory  # noqa: E402


def test_reports_policy_full_and_blocks(monkeypatch, capsys):
    monkeypatch.setattr(kept_set_memory, "PROBE",
                        dict(vocab_size=4096, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64))
    kept_set_memory.main(["--prompts", "1", "--responses", "4", "--length", "16"])  # 64 positions > D
    report = json.loads(capsys.readouterr().out)
    assert report["positions"] == 64 and report["logits_bytes"] == 64 * 4096 * 4
    assert report["policy"] == report["blocks"]
    for kind in ("forward_temp_bytes", "value_and_grad_temp_bytes"):
        assert 0 < report["blocks"][kind] < report["full"][kind], kind
    assert report["full"]["value_and_grad_temp_bytes"] >= report["logits_bytes"]
