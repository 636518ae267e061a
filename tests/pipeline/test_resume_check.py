"""`--resume` into an output folder whose checkpoints another stage, or other LoRA / model
settings, wrote: one `checkpoint error` line naming the folder (and the keys), before the
folder's config.yaml is replaced."""
import json

import pytest
import yaml

from rlhf_jax.pipeline import cli
from rlhf_jax.pipeline.errors import CheckpointError
from rlhf_jax.pipeline.resume_check import changed_settings, check_resume, stage_of
from rlhf_jax.pipeline.stage_configs import (DPOConfig, GRPOStageConfig, PPOStageConfig, RewardConfig, SFTConfig,
                                             load_stage_config)
from rlhf_jax.pipeline.stages.stage_setup import prepare_output_dir
from rlhf_jax.typed_config import to_dict

STAGES = {"sft": SFTConfig, "reward": RewardConfig, "dpo": DPOConfig, "ppo": PPOStageConfig, "grpo": GRPOStageConfig}


def resolved(stage, *overrides):
    return yaml.safe_load(yaml.safe_dump(to_dict(load_stage_config(STAGES[stage], None, list(overrides)))))


def checkpointed_run(folder, stage, *overrides):
    folder.mkdir(parents=True)
    (folder / "checkpoints" / "3").mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(resolved(stage, *overrides), sort_keys=False))
    return folder


@pytest.mark.parametrize("stage", list(STAGES))
def test_the_stage_is_told_from_its_config(stage):
    assert stage_of(resolved(stage)) == stage


def test_another_stage_is_refused(tmp_path):
    run = checkpointed_run(tmp_path / "run", "dpo")
    with pytest.raises(CheckpointError, match="holds the checkpoints of a `dpo` run") as error:
        check_resume(run, resolved("sft"), "sft")
    assert str(run) in str(error.value)


@pytest.mark.parametrize("before, after, message", [
    ((), ("lora.rank=4",), "lora: absent in the checkpointed run, set now"),
    (("lora.rank=4",), ("lora.rank=8",), "lora.rank: 4 in the checkpointed run, 8 now"),
    (("model.init={model_type: llama, hidden_size: 32, num_heads: 2}",), ("model.init={model_type: llama, hidden_size: 64, num_heads: 2}",),
     "model.init.hidden_size: 32 in the checkpointed run, 64 now"),
])
def test_settings_that_shape_the_parameters_are_refused(tmp_path, before, after, message):
    run = checkpointed_run(tmp_path / "run", "sft", *before)
    with pytest.raises(CheckpointError) as error:
        check_resume(run, resolved("sft", *after), "sft")
    assert message in str(error.value)


def model_folder(folder, **fields):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3", "hidden_size": 64, **fields}))
    return folder


def test_a_model_folder_of_another_architecture_is_refused(tmp_path):
    old, moved, other = (model_folder(tmp_path / "old"), model_folder(tmp_path / "moved", dtype="bfloat16"),
                         model_folder(tmp_path / "other", model_type="gemma3_text"))
    run = checkpointed_run(tmp_path / "run", "sft", f"model.path={old}")
    check_resume(run, resolved("sft", f"model.path={moved}"), "sft")  # the same model elsewhere
    with pytest.raises(CheckpointError, match="another architecture \\(model_type 'qwen3' -> 'gemma3_text'\\)"):
        check_resume(run, resolved("sft", f"model.path={other}"), "sft")


def test_other_settings_and_folders_without_checkpoints_pass(tmp_path):
    run = checkpointed_run(tmp_path / "run", "grpo", "lora.rank=4")
    check_resume(run, resolved("grpo", "lora.rank=4", "optim.learning_rate=0.1", "train.iterations=7"), "grpo")
    (run / "checkpoints" / "3").rmdir()
    check_resume(run, resolved("sft"), "sft")  # nothing to resume: a fresh start
    check_resume(tmp_path / "absent", resolved("sft"), "sft")


def test_the_command_refuses_before_replacing_the_runs_config(tmp_path, capsys):
    run = checkpointed_run(tmp_path / "run", "dpo")
    before = (run / "config.yaml").read_text()
    assert cli.main(["sft", "--resume", f"output_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlhf-jax sft: checkpoint error: `--resume`: ") and err.count("\n") == 1, err
    assert (run / "config.yaml").read_text() == before


def test_changed_settings_name_each_key_old_and_new():
    saved = resolved("sft", "train.batch_size=8", "data.train_files=[a.jsonl]", "train.stop_after=3")
    now = resolved("sft", "train.batch_size=16", "data.train_files=[b.jsonl]", "tokenizer=tok")
    assert changed_settings(saved, now) == ['data.train_files ["a.jsonl"] -> ["b.jsonl"]', "tokenizer null -> tok",
                                            "train.batch_size 8 -> 16"]  # train.stop_after: one invocation's
    assert changed_settings(saved, saved | {"seed": 3}) == ["seed 0 -> 3"]
    del saved["train"]["num_microbatches"]  # e.g. a key a later version added
    assert "train.num_microbatches (absent) -> 1" in changed_settings(saved, now)
    assert "train.num_microbatches 1 -> (absent)" in changed_settings(now, saved)


def test_resume_warns_of_changed_settings_and_keeps_the_earlier_config(tmp_path, capsys):
    """Accepted (the structure is the same), but named on stderr, and config.yaml's record of
    what the earlier steps ran with is kept as config.<n>.yaml."""
    run = tmp_path / "run"

    def prepare(*overrides):
        capsys.readouterr()
        prepare_output_dir(load_stage_config(SFTConfig, None, [f"output_dir={run}", "train.steps=8", *overrides]),
                           resume_stage="sft")
        return capsys.readouterr().err

    assert prepare("train.batch_size=8", "optim.learning_rate=0.003", "train.stop_after=5") == ""  # a new folder
    (run / "checkpoints" / "3").mkdir(parents=True)
    first = (run / "config.yaml").read_text()
    assert prepare("train.batch_size=8", "optim.learning_rate=0.003") == ""  # only train.stop_after differs
    assert not (run / "config.1.yaml").exists()
    first_without_stop = (run / "config.yaml").read_text()
    assert first_without_stop != first
    err = prepare("train.batch_size=16", "optim.learning_rate=0.01")
    assert err == (f"warning: --resume changes optim.learning_rate 0.003 -> 0.01, train.batch_size 8 -> 16 from "
                   f"{run / 'config.yaml'} (kept as {run / 'config.1.yaml'})\n")
    assert (run / "config.1.yaml").read_text() == first_without_stop
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["batch_size"] == 16
    err = prepare("train.batch_size=16", "optim.learning_rate=0.01", "train.steps=12")
    assert err.startswith("warning: --resume changes optim.total_steps 8 -> 12, train.steps 8 -> 12 from ")
    assert err.endswith(f"(kept as {run / 'config.2.yaml'})\n")
    assert yaml.safe_load((run / "config.2.yaml").read_text())["train"]["steps"] == 8
    assert prepare("train.batch_size=16", "optim.learning_rate=0.01", "train.steps=12") == ""
    assert sorted(path.name for path in run.glob("config*.yaml")) == ["config.1.yaml", "config.2.yaml", "config.yaml"]


def test_the_quickstart_and_eval_configs_are_told_apart():
    """(eval's `reward` section once made it look like a reward-model run.)"""
    assert stage_of(to_dict(cli.resolved_config("quickstart"))) == "quickstart"
    assert stage_of(to_dict(cli.resolved_config("eval"))) == "eval"
