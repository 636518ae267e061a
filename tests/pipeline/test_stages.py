"""The `rlhf-jax` stages on a tiny task: configs, errors through the CLI, outputs of each stage."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from stage_helpers import LENGTHS, QUIET, TINY_MODEL, preference_overrides, sft_overrides, tiny_task

from rlhf_jax.models.checkpoint_io import load_pretrained
from rlhf_jax.pipeline import cli
from rlhf_jax.pipeline.data_formats import DataError
from rlhf_jax.pipeline.metrics_log import read_metrics
from rlhf_jax.pipeline.stage_configs import (
    DPOConfig,
    EvalConfig,
    GRPOStageConfig,
    PPOStageConfig,
    RewardConfig,
    SFTConfig,
    load_stage_config,
)
from rlhf_jax.pipeline.stages import dpo, evaluate, grpo, ppo, reward, sft
from rlhf_jax.pipeline.stages.quickstart import QUICKSTART_RECIPE, load_quickstart_config
from rlhf_jax.pipeline.tokenizer import load_tokenizer
from rlhf_jax.typed_config import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


# ----------------------------------------------------------------------------- configs and errors


@pytest.mark.parametrize("name, cls", [("sft", SFTConfig), ("reward", RewardConfig), ("dpo", DPOConfig),
                                       ("ipo", DPOConfig), ("dpo_lora", DPOConfig), ("ppo", PPOStageConfig),
                                       ("grpo", GRPOStageConfig)])
def test_every_recipe_config_loads(name, cls):
    config = load_stage_config(cls, CONFIGS / f"{name}.yaml", [])
    assert load_stage_config(EvalConfig, CONFIGS / "eval.yaml", []).num_samples == 64
    assert config.output_dir == f"runs/{name}"
    if name == "ipo":
        assert config.dpo.loss_type == "ipo"
    assert (config.lora is not None) == (name == "dpo_lora")


def test_removed_grad_accum_steps_is_an_unknown_key(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("optim:\n  grad_accum_steps: 4\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"sft.yaml: unknown config key 'optim.grad_accum_steps'"):
        load_stage_config(SFTConfig, path, [])


def test_quickstart_yaml_is_the_built_in_recipe():
    assert load_quickstart_config(CONFIGS / "quickstart.yaml") == load_quickstart_config()
    assert load_quickstart_config().task["max_digits"] == QUICKSTART_RECIPE["task"]["max_digits"]


@pytest.mark.parametrize("stage, override, message", [
    ("sft", "train.stepz=3", "unknown config key 'train.stepz'.*valid keys: batch_size, num_microbatches"),
    ("sft", "bogus=1", "unknown config key 'bogus' at the top level; valid keys: checkpoint, data"),
    ("dpo", "train.steps=many", "`train.steps` must be an int, got 'many'"),
    ("reward", "optim.schedule=cosin", "schedule"),
    ("ppo", "ppo.sampling.temprature=1", "unknown config key 'ppo.sampling.temprature'.*temperature"),
    ("grpo", "grpo.group_size=1", "group_size"),
    ("eval", "num_samples=0", "`num_samples` must be >= 1"),
    ("quickstart", "sft.optim.lr=0.1", "unknown config key 'sft.optim.lr'.*learning_rate"),
    ("quickstart", "stages=[sft,rl]", "unknown quickstart stage 'rl'"),
    ("sft", "train.batch_size=0", "`train.batch_size` must be >= 1"),
])
def test_bad_config_keys_and_values_exit_2_naming_the_key(stage, override, message, capsys):
    assert cli.main([stage, override]) == 2
    err = capsys.readouterr().err
    assert f"rlhf-jax {stage}: config error" in err
    assert re.search(message, err), err


def test_unknown_key_in_a_yaml_file_names_the_file(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: 3\n  bach_size: 4\n")
    assert cli.main(["sft", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "train.bach_size" in err and "batch_size" in err


@pytest.mark.parametrize("override, message", [
    ("optim.learning_rat=0.1", "unknown config key 'optim.learning_rat'"),
    ("train.steps=0", "`train.steps` must be >= 1"),
    ("optim.schedule=cosin", "`optim.schedule` must be one of"),
    ("lora.rank=0", "`lora.rank` must be an integer >= 1, got 0"),
])
def test_a_bad_override_next_to_a_good_file_names_the_command_line(tmp_path, capsys, override, message):
    path = tmp_path / "good.yaml"
    path.write_text("train:\n  steps: 3\n")
    assert cli.main(["sft", "--config", str(path), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rlhf-jax sft: config error: command line: {message}") and str(path) not in err, err


@pytest.mark.parametrize("stage, override, message", [
    ("dpo", "dpo.loss_type=sigmoidd", "`dpo.loss_type` must be one of"),
    ("grpo", "grpo.group_size=1", "`grpo.group_size` must be an int >= 2, got 1"),
    ("grpo", "grpo.sampling.temperature=-1", "`grpo.sampling.temperature` must be > 0"),
    # ranges dpo_loss checks, now before any data is read
    ("dpo", "dpo.loss_type=robust dpo.label_smoothing=0.5",
     r"`dpo.label_smoothing` must be in [0, 0.5) for loss_type='robust', got 0.5"),
    ("dpo", "dpo.label_smoothing=1.5", r"`dpo.label_smoothing` must be in [0, 1) for loss_type='sigmoid', got 1.5"),
    ("dpo", "dpo.divergence=alpha dpo.alpha=1.0", "`dpo.alpha` must be in (0, 1) for divergence='alpha', got 1.0"),
    ("dpo", "dpo.loss_type=aot dpo.divergence=js", "`dpo`: loss_type='aot' sorts policy and reference margins"),
    ("dpo", "dpo.kind=simpo dpo.label_smoothing=-0.1", "`dpo.label_smoothing` must be in [0, 1), got -0.1"),
    # settings the chosen loss does not read
    ("dpo", "dpo.kind=simpo dpo.loss_type=ipo", "`dpo.loss_type` is not used by kind='simpo'; got 'ipo'"),
    ("dpo", "dpo.kind=orpo dpo.beta=5", "`dpo.beta` is not used by kind='orpo'; got 5.0"),
    ("dpo", "dpo.loss_type=hinge dpo.target_margin=3", "`dpo.target_margin` is not used by loss_type='hinge'; got 3.0"),
    ("dpo", "dpo.alpha=0.3", "`dpo.alpha` is not used by loss_type='sigmoid'; got 0.3"),
    ("dpo", "dpo.loss_type=ipo dpo.label_smoothing=0.1", "`dpo.label_smoothing` is not used by loss_type='ipo'; got 0.1"),
])
def test_a_sections_own_check_names_the_full_key(capsys, stage, override, message):
    assert cli.main([stage, "--print-config", *override.split()]) == 2
    assert capsys.readouterr().err.startswith(f"rlhf-jax {stage}: config error: {message}")


def test_missing_inputs_are_config_errors(tmp_path, capsys):
    assert cli.main(["sft", f"output_dir={tmp_path}"]) == 2
    assert "`tokenizer` must be set" in capsys.readouterr().err


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return tiny_task(tmp_path_factory.mktemp("task"))


def test_bad_data_row_names_file_and_row_through_the_cli(task, tmp_path, capsys):
    bad = tmp_path / "sft.jsonl"
    bad.write_text('{"prompt": "1+2=", "completion": "3"}\n{"prompt": "2+2="}\n')
    overrides = sft_overrides(task, tmp_path / "run", steps=1) + [f"data.train_files=[{bad}]", "data.eval_files=[]"]
    assert cli.main(["sft", *overrides]) == 2
    err = capsys.readouterr().err
    assert f"rlhf-jax sft: data error: {bad} row 2: field 'completion' is missing" in err


def test_long_prompt_is_a_bad_row_unless_skipped(task, tmp_path):
    rows = [{"prompt": f"{i}+{i}=", "completion": str(2 * i)} for i in range(1, 10)]
    rows.append({"prompt": "1234567+1=", "completion": "1234568"})
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    overrides = sft_overrides(task, tmp_path / "run", steps=1) + [f"data.train_files=[{path}]", "data.eval_files=[]"]
    with pytest.raises(DataError, match=r"row 10: prompt has 11 tokens, more than max_prompt_length=8"):
        sft.run(None, overrides)
    result = sft.run(None, overrides + ["data.skip_invalid=true"])
    assert result["finished"] and result["data"]["num_skipped"] == 1


# ----------------------------------------------------------------------------- the stages


@pytest.fixture(scope="module")
def sft_run(task, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    return out, sft.run(None, sft_overrides(task, out, steps=6, extra=("eval.every=3",)))


def test_sft_writes_metrics_tensorboard_checkpoints_and_a_hf_folder(sft_run):
    out, result = sft_run
    assert result["finished"] and result["steps"] == 6
    rows = read_metrics(out)
    assert [row["step"] for row in rows] == list(range(1, 7))
    assert {"sft/loss", "sft/accuracy", "optim/grad_norm"} <= set(rows[0])
    assert "eval/sft/loss" in rows[2] and "eval/sft/loss" in rows[5] and "eval/sft/loss" not in rows[3]
    assert rows[-1]["sft/loss"] < rows[0]["sft/loss"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "6").is_dir() and (out / "config.yaml").is_file()
    module, params = load_pretrained(out / "model")
    tokenizer = load_tokenizer(out / "model")
    assert type(module).__name__ == "CausalLM" and module.config.vocab_size == len(tokenizer)
    assert tokenizer.eos_token_id == module.config.eos_token_id == 1
    assert tokenizer.pad_token_id == module.config.pad_token_id == 0


def test_sft_on_the_default_mesh_of_eight_devices(task, tmp_path):
    overrides = [o for o in sft_overrides(task, tmp_path, steps=2) if o != "mesh.data=1"]
    result = sft.run(None, overrides + ["mesh.data=-1", "mesh.fsdp=1"])
    assert result["finished"] and np.isfinite(result["metrics"]["sft/loss"])


@pytest.fixture(scope="module")
def reward_run(task, sft_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("reward")
    return out, reward.run(None, preference_overrides(task, out, sft_run[0] / "model", steps=4))


def test_reward_model_from_the_sft_model(reward_run):
    tmp_path, result = reward_run
    assert result["finished"]
    rows = read_metrics(tmp_path)
    assert 0.0 <= rows[-1]["eval/reward/accuracy"] <= 1.0 and "reward/loss" in rows[0]
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForSequenceClassification"]
    module, _ = load_pretrained(tmp_path / "model")
    assert type(module).__name__ == "RewardModel"


@pytest.mark.parametrize("kind", ["simpo", "orpo"])
def test_reference_free_kinds_report_held_out_rewards_relative_to_the_start(task, sft_run, tmp_path, kind):
    """With a learning rate of 1e-30 the policy stays the starting model: every implicit reward is
    0, so `eval/dpo/accuracy` is 0 as for DPO (it was the policy's own accuracy before)."""
    result = dpo.run(None, preference_overrides(task, tmp_path, sft_run[0] / "model", steps=1,
                                                extra=(f"dpo.kind={kind}", "optim.learning_rate=1e-30")))
    row = read_metrics(tmp_path)[-1]
    assert result["finished"] and row["eval/dpo/accuracy"] == 0.0 and row["eval/dpo/margin"] == 0.0
    assert row["eval/dpo/policy_accuracy"] == row["eval/dpo/reference_accuracy"] > 0.0


@pytest.mark.parametrize("loss", ["dpo.loss_type=ipo", "dpo.kind=simpo"])
def test_preference_variants_train(task, sft_run, tmp_path, loss):
    result = dpo.run(None, preference_overrides(task, tmp_path, sft_run[0] / "model", steps=2,
                                                extra=(loss, "eval.every=1")))
    kind = "simpo" if "simpo" in loss else "dpo"
    assert result["finished"] and np.isfinite(result["metrics"][f"{kind}/loss"])
    assert "eval/dpo/accuracy" in read_metrics(tmp_path)[0]


def _rl_overrides(task, output_dir, policy):
    return [f"output_dir={output_dir}", f"policy.path={policy}", f"data.train_files=[{task.prompts}]",
            *LENGTHS, *QUIET, "train.batch_size=8", "optim.learning_rate=0.001", "checkpoint.interval=1"]


def test_ppo_with_the_gold_scorer_and_grpo_with_a_reward_model(task, sft_run, reward_run, tmp_path):
    policy = sft_run[0] / "model"
    rm_dir = reward_run[0]
    result = ppo.run(None, _rl_overrides(task, tmp_path / "ppo", policy) + [
        "train.iterations=2", "reward.kind=gold", "ppo.sampling.max_new_tokens=5",
        "ppo.num_minibatches=2", "ppo.epochs=1"])
    assert result["finished"]
    rows = read_metrics(tmp_path / "ppo")
    assert len(rows) == 2 and 0.0 <= rows[0]["objective/scores"] <= 1.0
    assert {"objective/kl", "ppo/clipfrac", "value/loss"} <= set(rows[0])
    assert load_pretrained(tmp_path / "ppo" / "model")[0].config.num_layers == 1
    result = grpo.run(None, _rl_overrides(task, tmp_path / "grpo", policy) + [
        "train.iterations=2", "reward.kind=reward_model", f"reward.path={rm_dir / 'model'}",
        "train.batch_size=2", "grpo.group_size=4", "grpo.sampling.max_new_tokens=5"])
    assert result["finished"] and "grpo/kl" in read_metrics(tmp_path / "grpo")[0]
    # the reward model, scored in the generate phase, with dynamic sampling between the phases
    result = grpo.run(None, _rl_overrides(task, tmp_path / "grpo_dynamic", policy) + [
        "train.iterations=2", "reward.kind=reward_model", f"reward.path={rm_dir / 'model'}",
        "train.batch_size=2", "grpo.group_size=4", "grpo.sampling.max_new_tokens=5",
        "dynamic_sampling.enabled=true", "mask_truncated=true"])
    rows = read_metrics(tmp_path / "grpo_dynamic")
    assert result["finished"] and rows[0]["dynamic_sampling/refills"] == 0.0  # model scores never tie
    # nothing dropped: the groups trained on are the groups sampled
    assert rows[0]["dynamic_sampling/selected_scores"] == pytest.approx(rows[0]["objective/scores"])


def test_ppo_with_kl_coef_zero_runs_no_reference(task, sft_run, tmp_path):
    """No KL penalty: the reference is never loaded (a folder that does not exist is not read,
    with a warning that says so) and no KL is logged."""
    with pytest.warns(UserWarning, match=r"reference=.*no_such_folder is not read: ppo.kl_coef is 0"):
        result = ppo.run(None, _rl_overrides(task, tmp_path / "ppo", sft_run[0] / "model") + [
            "train.iterations=1", "reward.kind=gold", "ppo.sampling.max_new_tokens=2", "ppo.kl_coef=0",
            f"reference={tmp_path / 'no_such_folder'}", "ppo.num_minibatches=1", "ppo.epochs=1",
            "checkpoint.interval=0"])
    row = read_metrics(tmp_path / "ppo")[0]
    assert result["finished"] and "objective/kl" not in row and row["objective/kl_coef"] == 0.0


def test_grpo_logs_the_responses_as_sampled_whatever_masks_them(task, sft_run, tmp_path):
    """`mask_truncated` takes responses without EOS out of the loss, not out of the logged
    length and EOS rate: the same first rollout logs the same `rollout/*` with and without it;
    and `grpo.kl_coef=0` computes no KL, so logs none (a 0 would read as "at the reference")."""
    policy = sft_run[0] / "model"
    rows = {}
    for name, extra in {"plain": [], "masked": ["mask_truncated=true"]}.items():
        grpo.run(None, _rl_overrides(task, tmp_path / name, policy) + [
            "train.iterations=1", "reward.kind=gold", "train.batch_size=2", "grpo.group_size=4",
            "grpo.sampling.max_new_tokens=2", "grpo.kl_coef=0", "checkpoint.interval=0", *extra])
        rows[name] = read_metrics(tmp_path / name)[0]
    assert rows["plain"]["rollout/eos_rate"] < 1.0  # some responses were cut: masking changes the loss
    for key in ("rollout/response_length", "rollout/eos_rate", "objective/scores"):
        assert rows["masked"][key] == rows["plain"][key], key
    assert rows["masked"]["grpo/entropy"] != rows["plain"]["grpo/entropy"]  # over the tokens left in the loss
    assert "grpo/kl" not in rows["plain"] and "objective/kl" not in rows["plain"]


def test_eval_stage_reports_pass_at_k_win_rate_and_kl(task, sft_run, tmp_path):
    policy = str(sft_run[0] / "model")
    results = evaluate.run(None, [
        f"output_dir={tmp_path}", f"policies={{a: {policy}, b: {policy}}}", f"reference={policy}",
        f"prompts_file={task.eval_prompts}", "num_samples=4", "max_new_tokens=5", "batch_size=16",
        f"runs={{sft: {sft_run[0]}}}"])
    a = results["policies"]["a"]
    assert sorted(a["pass@k"]) == [1, 2, 4] and a["pass@1"] == a["gold_reward"]
    assert a["win_rate"] == 0.5 and a["kl_to_reference"] == 0.0  # the reference against itself
    assert results["policies"]["b"] == {**a, "seconds": results["policies"]["b"]["seconds"]}
    report = (tmp_path / "report.md").read_text()
    assert "pass@k" in report and "plots/sft_curves.png" in report
    assert (tmp_path / "plots" / "pass_at_k.png").is_file()
    assert json.loads((tmp_path / "results.json").read_text())["num_samples"] == 4


def test_lengths_past_the_models_positions(task, tmp_path, capsys):
    """Learned positions (GPT-2) end: a config error naming the keys; RoPE runs on past its
    max_position_embeddings: one warning line."""
    learned = TINY_MODEL.replace("max_position_embeddings: 32", "max_position_embeddings: 12, "
                                 "position_embedding: learned")
    argv = [arg if not arg.startswith("model.init=") else f"model.init={learned}"
            for arg in sft_overrides(task, tmp_path / "learned", steps=1)]
    assert cli.main(["sft", *argv]) == 2
    assert capsys.readouterr().err.strip() == (
        "rlhf-jax sft: config error: `data.max_prompt_length` + `data.max_response_length` = 16 tokens, more than the "
        "`model` model's max_position_embeddings (12): it has no position embeddings past them; lower the lengths")
    rope = TINY_MODEL.replace("max_position_embeddings: 32", "max_position_embeddings: 12")
    argv = [arg if not arg.startswith("model.init=") else f"model.init={rope}"
            for arg in sft_overrides(task, tmp_path / "rope", steps=1)]
    assert cli.main(["sft", *argv]) == 0
    assert capsys.readouterr().err.strip() == (
        "warning: `data.max_prompt_length` + `data.max_response_length` = 16 tokens, more than the `model` model's "
        "max_position_embeddings (12): RoPE runs past them, at positions the model was not trained on")
