"""Killing a stage and resuming it ends with exactly the metrics and parameters of an
uninterrupted run (CPU, same seed): SFT and DPO through the shared training loop, PPO and GRPO
through the rollout loop."""
from __future__ import annotations

import json

import pytest
import yaml
from stage_helpers import LENGTHS, QUIET, preference_overrides, sft_overrides, tiny_task

from rlhf_jax.pipeline import cli
from rlhf_jax.pipeline.checkpoint import Checkpointer
from rlhf_jax.pipeline.metrics_log import read_metrics
from rlhf_jax.pipeline.stages import dpo, grpo, ppo, sft

SFT_STEPS = 8


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return tiny_task(tmp_path_factory.mktemp("task"))


def _weights(run_dir):
    return (run_dir / "model" / "model.safetensors").read_bytes()


def _kill_and_resume(run, overrides, run_dir, stop_after, *, stop_key="train.stop_after"):
    """Run with `stop_after` (a kill: no final checkpoint, no export), then resume."""
    stopped = run(None, overrides + [f"{stop_key}={stop_after}"])
    assert not stopped["finished"] and "model_dir" not in stopped
    assert not (run_dir / "model").exists()
    assert read_metrics(run_dir)[-1]["step"] == stop_after  # steps after the last checkpoint were logged
    resumed = run(None, overrides, resume=True)
    assert resumed["finished"]
    return resumed


@pytest.fixture(scope="module")
def sft_runs(task, tmp_path_factory):
    """An uninterrupted run `a` and a run `b` killed at step 5 and resumed. Checkpoints every
    3 steps: the kill loses steps 4-5, which the resumed run replays."""
    root = tmp_path_factory.mktemp("sft")
    extra = ("eval.every=2",)
    straight = sft.run(None, sft_overrides(task, root / "a", steps=SFT_STEPS, extra=extra))
    overrides = sft_overrides(task, root / "b", steps=SFT_STEPS, extra=extra)
    resumed = _kill_and_resume(sft.run, overrides, root / "b", stop_after=5)
    return root, straight, resumed, overrides


def test_sft_killed_and_resumed_matches_uninterrupted(sft_runs):
    root, straight, resumed, _ = sft_runs
    assert straight["finished"] and straight["resumed_from"] is None
    assert resumed["resumed_from"] == 3
    rows_a, rows_b = read_metrics(root / "a"), read_metrics(root / "b")
    assert [row["step"] for row in rows_b] == list(range(1, SFT_STEPS + 1))
    assert rows_a == rows_b  # every value, bit for bit (JSON floats round-trip exactly)
    assert any("eval/sft/loss" in row for row in rows_b)
    assert _weights(root / "a") == _weights(root / "b")


def test_checkpoint_holds_state_optimizer_and_data_position(sft_runs):
    root = sft_runs[0]
    with Checkpointer(root / "b" / "checkpoints", create=False) as checkpointer:
        assert checkpointer.latest_step() == SFT_STEPS
        carry, meta = checkpointer.restore()
    assert int(carry["state"]["step"]) == SFT_STEPS and "opt_state" in carry["state"]
    assert carry["rng"].shape == (2,)  # the stage's RNG key
    assert meta["step"] == SFT_STEPS
    assert meta["data_position"] == {"epoch": 0, "index": SFT_STEPS}  # 96 rows / 8 per batch


def test_config_yaml_records_the_schedule_length_used(sft_runs):
    """Not the dataclass default (1000): the run's `train.steps`, through the kill and resume."""
    saved = yaml.safe_load((sft_runs[0] / "b" / "config.yaml").read_text())
    assert saved["optim"]["total_steps"] == saved["train"]["steps"] == SFT_STEPS


def test_resuming_a_finished_run_only_reexports(sft_runs, capsys):
    root, _, _, overrides = sft_runs
    weights, rows = _weights(root / "b"), read_metrics(root / "b")
    capsys.readouterr()
    again = sft.run(None, overrides, resume=True)
    out = capsys.readouterr().out
    assert f"[sft] resuming from the checkpoint of step {SFT_STEPS} (of {SFT_STEPS})\n" in out, out
    assert again["finished"] and again["resumed_from"] == SFT_STEPS and again["steps"] == SFT_STEPS
    assert _weights(root / "b") == weights and read_metrics(root / "b") == rows


def test_resume_without_config_continues_with_the_runs_config_yaml(task, sft_runs, tmp_path, capsys):
    """`rlhf-jax sft --resume output_dir=X`: X/config.yaml is the config (its stop_after reset),
    so the run ends as the uninterrupted one, without a changed-settings warning."""
    root, out = sft_runs[0], tmp_path / "c"
    overrides = sft_overrides(task, out, steps=SFT_STEPS, extra=("eval.every=2",))
    assert cli.main(["sft", *overrides, "train.stop_after=5"]) == 0
    capsys.readouterr()
    assert cli.main(["sft", "--resume", f"output_dir={out}"]) == 0
    captured = capsys.readouterr()
    assert f"[sft] resuming from the checkpoint of step 3 (of {SFT_STEPS})" in captured.out, captured.out
    assert captured.err == "", captured.err
    assert read_metrics(out) == read_metrics(root / "a") and _weights(out) == _weights(root / "a")
    assert not list(out.glob("config.*.yaml"))


def test_resume_without_checkpoint_starts_fresh_and_a_fresh_run_clears_checkpoints(task, tmp_path, capsys):
    capsys.readouterr()
    first = sft.run(None, sft_overrides(task, tmp_path, steps=3), resume=True)
    assert first["finished"] and first["resumed_from"] is None
    captured = capsys.readouterr()
    assert captured.err == (f"warning: --resume found no checkpoint in {tmp_path / 'checkpoints'}; "
                            f"starting from step 0\n"), captured.err  # e.g. a mistyped output_dir
    assert "resuming from" not in captured.out
    second = sft.run(None, sft_overrides(task, tmp_path, steps=4))  # no --resume: starts over
    assert second["resumed_from"] is None
    assert [row["step"] for row in read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_dpo_killed_and_resumed_matches_uninterrupted(task, sft_runs, tmp_path, capsys):
    policy = sft_runs[0] / "a" / "model"
    dpo.run(None, preference_overrides(task, tmp_path / "a", policy, steps=5))
    overrides = preference_overrides(task, tmp_path / "b", policy, steps=5)
    capsys.readouterr()
    resumed = _kill_and_resume(dpo.run, overrides, tmp_path / "b", stop_after=3)
    assert resumed["resumed_from"] == 2
    captured = capsys.readouterr()
    assert "[dpo] resuming from the checkpoint of step 2 (of 5)\n" in captured.out, captured.out
    assert "warning" not in captured.err, captured.err
    assert read_metrics(tmp_path / "a") == read_metrics(tmp_path / "b")
    assert _weights(tmp_path / "a") == _weights(tmp_path / "b")
    saved = json.loads((tmp_path / "b" / "model" / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForCausalLM"]


def test_ppo_killed_and_resumed_matches_uninterrupted(task, sft_runs, tmp_path):
    """The PPO carry holds the policy and value states, the KL controller and the RNG key."""
    policy = sft_runs[0] / "a" / "model"

    def overrides(name):
        return [f"output_dir={tmp_path / name}", f"policy.path={policy}", f"value={policy}",
                f"data.train_files=[{task.prompts}]", *LENGTHS, *QUIET, "reward.kind=gold",
                "train.iterations=3", "train.batch_size=8", "checkpoint.interval=1",
                "ppo.sampling.max_new_tokens=5", "ppo.epochs=1", "ppo.num_minibatches=2",
                "ppo.adaptive_kl=true", "optim.learning_rate=0.001"]

    ppo.run(None, overrides("a"))
    resumed = _kill_and_resume(ppo.run, overrides("b"), tmp_path / "b", stop_after=2)
    assert resumed["resumed_from"] == 2
    rows = read_metrics(tmp_path / "b")
    assert read_metrics(tmp_path / "a") == rows and len(rows) == 3
    assert rows[0]["objective/kl_coef"] != rows[2]["objective/kl_coef"]  # the controller moved
    saved = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert saved["optim"]["total_steps"] == 3 * 1 * 2  # iterations x epochs x num_minibatches
    assert _weights(tmp_path / "a") == _weights(tmp_path / "b")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    ("dynamic_sampling.enabled=true", "dynamic_sampling.max_refills=2"),
    ("lora.rank=2", "lora.alpha=16", "lora.targets=[q_proj,v_proj]"),
], ids=["dynamic-sampling", "lora"])
def test_grpo_killed_and_resumed_matches_uninterrupted(task, sft_runs, tmp_path, extra):
    """The GRPO carry holds the policy state and the RNG key, and the data position counts
    the prompt batches that dynamic sampling's refills drew; a LoRA checkpoint holds no base
    (the resumed run reads it again from `policy.path`)."""
    policy = sft_runs[0] / "a" / "model"

    def overrides(name):
        return [f"output_dir={tmp_path / name}", f"policy.path={policy}", f"data.train_files=[{task.prompts}]",
                *LENGTHS, *QUIET, "reward.kind=gold", "train.iterations=3", "train.batch_size=8",
                "checkpoint.interval=1", "grpo.group_size=4", "grpo.sampling.max_new_tokens=5",
                "grpo.kl_coef=0.05", "optim.learning_rate=0.001", *extra]

    grpo.run(None, overrides("a"))
    resumed = _kill_and_resume(grpo.run, overrides("b"), tmp_path / "b", stop_after=2)
    assert resumed["resumed_from"] == 2
    rows = read_metrics(tmp_path / "b")
    assert read_metrics(tmp_path / "a") == rows and len(rows) == 3
    assert _weights(tmp_path / "a") == _weights(tmp_path / "b")
    if "dynamic_sampling.enabled=true" in extra:  # refills drew further prompt batches
        assert all(row["dynamic_sampling/refills"] > 0 for row in rows)
