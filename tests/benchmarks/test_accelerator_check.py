"""The accelerator check (benchmarks/accelerator_check.sh + .py): its dry run on this CPU, so the
script cannot rot between accelerator runs, and the bookkeeping that turns numbers into the
report."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import accelerator_check  # noqa: E402
import generate as generation  # noqa: E402
from rlhf_jax.models.config import MODEL_TYPES, ModelConfig  # noqa: E402


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.slow
def test_dry_run_writes_every_section_with_numbers(tmp_path):
    env = {**os.environ, "INSTALL": "0", "PYTHON": sys.executable, "OUT": str(tmp_path / "unused"),
           "CHECK_TIMEOUT": "1000"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "accelerator_check.sh"), "--dry-run",
                           "--out", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "accelerator_check.json").read_text())
    for name in accelerator_check.SECTIONS:
        assert results[name]["status"] == "ok", (name, results[name].get("error"), results[name].get("traceback"))

    machine = results["machine"]
    assert machine["device_kind"] and machine["versions"]["jax"] != "not installed"
    assert is_number(machine["matmul"]["tflops"]) and machine["matmul"]["tflops"] > 0

    parity = results["parity"]
    assert [r["model_type"] for r in parity["families"]] == list(MODEL_TYPES)
    for record in parity["families"]:
        assert "error" not in record, record
        assert record["float32_max_abs_diff"] <= 1e-4 and record["float32_ok"] and record["bfloat16_ok"], record
        assert record["max_abs_logit"] > 0.5  # the logits compared are not all near zero
    assert parity["all_ok"]

    rows = results["training"]["rows"]
    assert set(rows) == set(accelerator_check.KINDS)
    for kind, row in rows.items():
        assert "error" not in row and "skipped" not in row, (kind, row)
        for key in ("ours_tokens_per_s", "ours_mfu", "ours_fraction_of_matmul", "flops_per_step", "compile_seconds"):
            assert is_number(row[key]) and row[key] >= 0, (kind, key, row.get(key))
        assert row["ours_tokens_per_s"] > 0
        if "trl_skipped" in row:
            assert row["trl_skipped"].strip()
        else:
            assert is_number(row["trl_tokens_per_s"]) and is_number(row["speedup"]), (kind, row)
        assert row["memory"]["end_of_case"]["peak_bytes"] > 0

    gen = results["generation"]
    for side in ("ours", "transformers"):
        assert gen["tokens_per_s"][side] > 0
        assert is_number(gen["roofline"][side]["fraction_of_hbm"])
    assert gen["bytes_per_step"]["total"] > 0

    memory = results["memory"]["training_cases"]
    assert set(memory) == set(accelerator_check.KINDS)
    assert all(case["end_of_case"]["peak_bytes"] > 0 for case in memory.values())

    assert [t["target"] for t in results["targets"]] == list(accelerator_check.TARGETS)
    report = (tmp_path / "accelerator_check.md").read_text()
    assert report.startswith("## Accelerator (") and "### Targets" in report


def fake_section(value):
    def run(ctx):
        if isinstance(value, Exception):
            raise value
        return dict(value)
    return run


def test_a_failing_section_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    monkeypatch.setattr(accelerator_check, "SECTION_FUNCTIONS", {
        "machine": fake_section({"device_kind": "test device"}),
        "parity": fake_section(RuntimeError("no device")),
        "training": fake_section({"rows": {}}),
        "generation": fake_section({}),
        "memory": fake_section({"training_cases": {}}),
    })
    results = accelerator_check.main(["--out", str(tmp_path), "--dry-run", "--workdir", str(tmp_path / "work")])
    assert results["parity"]["status"] == "error" and "RuntimeError: no device" in results["parity"]["error"]
    assert [results[name]["status"] for name in ("machine", "training", "generation", "memory")] == ["ok"] * 4
    written = json.loads((tmp_path / "accelerator_check.json").read_text())
    assert written["parity"]["traceback"] and written["memory"]["status"] == "ok"
    assert "Failed sections: parity: RuntimeError: no device" in (tmp_path / "accelerator_check.md").read_text()


def test_a_spent_time_limit_skips_sections_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(accelerator_check, "SECTION_FUNCTIONS",
                        {name: fake_section({}) for name in accelerator_check.SECTIONS})
    results = accelerator_check.main(["--out", str(tmp_path), "--dry-run", "--time-limit", "0",
                                      "--workdir", str(tmp_path / "work")])
    assert all(results[name]["status"] == "skipped" for name in accelerator_check.SECTIONS)
    assert results["machine"]["skipped"] == "the run's time limit ran out"


def test_rates_mfu_and_targets_from_step_times():
    row = accelerator_check.add_rates(dict(flops_per_step=4e12, ours_seconds=0.01, trl_seconds=0.02, speedup=2.0),
                                      peak_tflops=1000.0, matmul_tflops=800.0)
    assert row["ours_tflops"] == pytest.approx(400.0) and row["ours_mfu"] == pytest.approx(0.4)
    assert row["ours_fraction_of_matmul"] == pytest.approx(0.5) and row["trl_mfu"] == pytest.approx(0.2)
    results = {"training": {"rows": {"dpo": row, "sft": {"ours_mfu": 0.1}, "grpo": {"error": "x"}}},
               "generation": {"speedup": 6.0}}
    met = {t["target"]: t["met"] for t in accelerator_check.targets(results)}
    assert met == {"DPO step MFU (bf16, dense peak)": True, "SFT step MFU (bf16, dense peak)": False,
                   "GRPO update MFU (bf16, dense peak)": None, "DPO step tokens/s, ours / TRL": True,
                   "generation new tokens/s, ours / transformers": True}


def test_decode_bytes_per_step_counts_weights_and_cache():
    config = ModelConfig.llama(vocab_size=100, hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1,
                               intermediate_size=16)
    # per layer: q and o 8x8 each, k and v 8x4 each, MLP 3 x 8x16; LM head 8x100; 3 embedding rows
    weights = 2 * (2 * 64 + 2 * 32 + 3 * 128) + 800 + 3 * 8
    cache = 2 * 2 * 3 * 10 * 1 * 4  # k and v, layers, batch, context, kv heads, head dim
    got = generation.decode_bytes_per_step(config, batch=3, context=10, param_bytes=2, cache_bytes=2)
    assert got == {"weights": 2.0 * weights, "kv_cache": 2.0 * cache, "total": 2.0 * (weights + cache)}
