"""A scaled-down `rlhf-jax quickstart`: every stage, the evaluation and the report."""
from __future__ import annotations

import json

import pytest

from rlhf_jax.pipeline import cli
from rlhf_jax.pipeline.metrics_log import read_metrics

STAGES = ("sft", "reward", "ppo", "dpo", "grpo")
SMALL = [
    "task.num_sft=128", "task.num_preferences=64", "task.num_prompts=32", "task.num_eval_prompts=8",
    "task.num_eval_preferences=16",
    "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
    "sft.train.steps=8", "sft.eval.every=4", "sft.train.batch_size=16",
    "reward.train.steps=3", "reward.train.batch_size=16",
    "dpo.train.steps=3", "dpo.train.batch_size=16",
    "ppo.train.iterations=2", "ppo.train.batch_size=8", "ppo.ppo.num_minibatches=2", "ppo.ppo.epochs=1",
    "grpo.train.iterations=2", "grpo.train.batch_size=2", "grpo.grpo.group_size=4",
    "eval.num_samples=8", "eval.batch_size=64",
    *[f"{stage}.{key}" for stage in STAGES for key in ("mesh.data=1", "logging.progress=false")],
]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    assert cli.main(["quickstart", f"output_dir={out}", *SMALL]) == 0
    return out


def test_every_stage_runs_and_exports_a_model(quickstart):
    for stage in STAGES:
        assert (quickstart / stage / "model" / "config.json").is_file(), stage
        assert read_metrics(quickstart / stage), stage
    assert (quickstart / "task" / "tokenizer" / "tokenizer.json").is_file()


def test_results_hold_every_metric_for_every_policy(quickstart):
    results = json.loads((quickstart / "results.json").read_text())
    assert set(results["policies"]) == {"sft", "ppo", "dpo", "grpo"}
    for name, metrics in results["policies"].items():
        assert sorted(int(k) for k in metrics["pass@k"]) == [1, 2, 4, 8], name
        assert 0.0 <= metrics["pass@1"] <= metrics["pass@k"]["8"] <= 1.0
        for key in ("gold_reward", "win_rate", "kl_to_reference", "response_length", "eos_rate",
                    "distinct_2", "repetition_4", "unique_responses", "reward_model_score"):
            assert key in metrics, (name, key)
    sft = results["policies"]["sft"]
    assert sft["win_rate"] == 0.5 and sft["kl_to_reference"] == 0.0
    assert 0.0 <= results["reward_model_accuracy"] <= 1.0
    assert [row["stage"] for row in results["timings"]] == ["task", *STAGES, "eval", "total"]
    assert {row["claim"] for row in results["checks"]} >= {"PPO pass@1 >= 1.5 x SFT pass@1"}


def test_report_has_tables_and_plots(quickstart):
    report = (quickstart / "report.md").read_text()
    for heading in ("## Quick start", "## Policies", "## Reward model", "## pass@k",
                    "## Training curves: sft", "## Training curves: ppo", "## Training curves: grpo"):
        assert heading in report, heading
    assert "| policy | pass@1 |" in report
    for plot in ("pass_at_k", "sft_curves", "reward_curves", "ppo_curves", "dpo_curves", "grpo_curves"):
        path = quickstart / "plots" / f"{plot}.png"
        assert path.read_bytes()[:4] == b"\x89PNG" and f"plots/{plot}.png" in report
