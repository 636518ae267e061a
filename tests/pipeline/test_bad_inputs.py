"""Broken inputs through the `rlhf-jax` command: each is one line `rlhf-jax <stage>: <kind>
error: ...` naming the culprit, exit code 2, and no traceback (a damaged latest checkpoint is
a one-line warning, and the run resumes from the newest readable one).

Most cases call the command's `main` in this process (the same code path as the console
script, its stderr captured); two run `python -m rlhf_jax.pipeline.cli` in a subprocess."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from model_folder_edits import edit_tensors, truncate_weights
from stage_helpers import LENGTHS, QUIET, TINY_MODEL, tiny_task

from rlhf_jax.models.checkpoint_io import save_pretrained
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.heads import RewardModel
from rlhf_jax.models.transformer import CausalLM
from rlhf_jax.pipeline import cli
from rlhf_jax.pipeline.metrics_log import read_metrics
from rlhf_jax.pipeline.tokenizer import build_tokenizer, load_tokenizer

REPO = Path(__file__).resolve().parents[2]
K_PROJ = "model.layers.0.self_attn.k_proj.weight"


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return tiny_task(tmp_path_factory.mktemp("task"))


def tiny_folder(task, folder, cls=CausalLM):
    """A tiny model folder (weights, config, tokenizer) of `cls` that every stage accepts (its
    64 positions hold a prompt plus the default 32 sampled tokens: no positions warning)."""
    tokenizer = load_tokenizer(task.tokenizer_dir)
    config = ModelConfig.llama(vocab_size=len(tokenizer), hidden_size=32, num_layers=1, num_heads=2,
                               intermediate_size=64, max_position_embeddings=64)
    module = cls(config)
    params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"]
    folder = save_pretrained(folder, module, params, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def good_model(task, tmp_path_factory):
    """A tiny policy folder that every stage accepts."""
    return tiny_folder(task, tmp_path_factory.mktemp("good") / "model")


def run_cli(capsys, *argv) -> tuple[int, list[str], str]:
    """`rlhf-jax argv...` in this process: (exit code, non-empty stderr lines, stderr)."""
    capsys.readouterr()
    code = cli.main([str(arg) for arg in argv])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()], err


def assert_one_error_line(code, lines, err, stage, kind, *culprits):
    assert "Traceback" not in err, err
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"rlhf-jax {stage}: {kind} error: "), lines[0]
    for culprit in culprits:
        assert str(culprit) in lines[0], (culprit, lines[0])


def sft_args(task, output_dir, *extra):
    return ["sft", f"output_dir={output_dir}", f"tokenizer={task.tokenizer_dir}", f"model.init={TINY_MODEL}",
            f"data.train_files=[{task.sft}]", *LENGTHS, *QUIET, "train.steps=4", "train.batch_size=8",
            "checkpoint.keep=null", "checkpoint.async_save=false", *extra]


# ----------------------------------------------------------------------------- model folders


def _unknown_model_type(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "t5"}))


MODEL_BREAKAGES = {
    "no config.json": (lambda f: (f / "config.json").unlink(), "no config.json"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "no *.safetensors weights"),
    "pytorch_model.bin only": (lambda f: (f / "model.safetensors").rename(f / "pytorch_model.bin"),
                               "found pytorch_model.bin"),
    "truncated safetensors": (truncate_weights(2 / 3), "model.safetensors: truncated"),
    "unknown model_type": (_unknown_model_type, "model_type 't5' is not supported"),
    "wrong shape": (edit_tensors(lambda t: t.update({K_PROJ: np.zeros((3, 32), np.float32)})),
                    f"tensor '{K_PROJ}' has shape (3, 32)"),
    "missing tensor": (edit_tensors(lambda t: t.pop(K_PROJ)), f"missing tensor '{K_PROJ}'"),
}


def broken_copy(good_model, folder, breakage):
    shutil.copytree(good_model, folder)
    MODEL_BREAKAGES[breakage][0](folder)
    return folder


@pytest.mark.parametrize("breakage", list(MODEL_BREAKAGES))
def test_broken_policy_folder(task, good_model, tmp_path, capsys, breakage):
    folder = broken_copy(good_model, tmp_path / "policy", breakage)
    result = run_cli(capsys, *sft_args(task, tmp_path / "out", f"model.path={folder}"))
    assert_one_error_line(*result, "sft", "model", f"{folder}: ", MODEL_BREAKAGES[breakage][1])


def test_broken_reference_folder(task, good_model, tmp_path, capsys):
    folder = broken_copy(good_model, tmp_path / "reference", "truncated safetensors")
    result = run_cli(capsys, "dpo", f"output_dir={tmp_path / 'out'}", f"model.path={good_model}",
                     f"reference={folder}", f"data.train_files=[{task.preferences}]", *LENGTHS, *QUIET,
                     "train.steps=2", "train.batch_size=8")
    assert_one_error_line(*result, "dpo", "model", f"{folder}: model.safetensors: truncated")


def _ppo_args(task, good_model, output_dir, *extra):
    return ["ppo", f"output_dir={output_dir}", f"policy.path={good_model}", f"data.train_files=[{task.prompts}]",
            *LENGTHS, *QUIET, "train.iterations=1", "train.batch_size=8", "ppo.num_minibatches=2", *extra]


def test_broken_reward_folder(task, good_model, tmp_path, capsys):
    folder = broken_copy(tiny_folder(task, tmp_path / "good_reward", RewardModel), tmp_path / "reward",
                         "missing tensor")
    result = run_cli(capsys, *_ppo_args(task, good_model, tmp_path / "out", f"value={good_model}",
                                        f"reward.path={folder}"))
    assert_one_error_line(*result, "ppo", "model", f"{folder}: missing tensor '{K_PROJ}'")


def test_broken_value_folder(task, good_model, tmp_path, capsys):
    folder = broken_copy(good_model, tmp_path / "value", "no config.json")
    result = run_cli(capsys, *_ppo_args(task, good_model, tmp_path / "out", f"value={folder}", "reward.kind=gold"))
    assert_one_error_line(*result, "ppo", "model", f"{folder}: no config.json")


def test_missing_model_folder_names_it_and_the_key(task, tmp_path, capsys):
    result = run_cli(capsys, *sft_args(task, tmp_path / "out", f"model.path={tmp_path / 'absent'}"))
    assert_one_error_line(*result, "sft", "model", f"{tmp_path / 'absent'}: no such model folder (`model.path`)")


@pytest.mark.parametrize("stage, key", [("sft", "model.path"), ("grpo", "policy.path"), ("eval", "policies.a")])
def test_missing_model_folder_that_also_holds_the_tokenizer(task, tmp_path, capsys, stage, key):
    """Without a `tokenizer` key the tokenizer is read from the model folder: a missing folder
    is reported as the model folder it is, not as a missing tokenizer."""
    absent = tmp_path / "absent"
    args = {"sft": [f"data.train_files=[{task.sft}]"], "grpo": [f"data.train_files=[{task.prompts}]"],
            "eval": [f"prompts_file={task.eval_prompts}"]}[stage]
    result = run_cli(capsys, stage, f"output_dir={tmp_path / 'out'}", f"{key}={absent}", *args)
    assert_one_error_line(*result, stage, "model", f"{absent}: no such model folder (`{key}`)")


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_a_tokenizer_that_is_not_the_model_folders_own_is_refused(task, good_model, tmp_path, capsys, stage):
    """configs/sft.yaml names the quick start's tokenizer: kept next to a `model.path` of another
    vocabulary it would feed the model ids of other tokens."""
    other = tmp_path / "other_tokenizer"
    build_tokenizer(other, "abc")
    key = "model.path" if stage == "sft" else "policy.path"
    args = [f"data.train_files=[{task.sft if stage == 'sft' else task.prompts}]"]
    result = run_cli(capsys, stage, f"output_dir={tmp_path / 'out'}", f"{key}={good_model}", f"tokenizer={other}",
                     *args, *LENGTHS)
    assert_one_error_line(*result, stage, "config", f"`tokenizer` ({other}, 10 tokens) is not the tokenizer of "
                          f"`{key}` ({good_model}, ", "set `tokenizer: null`")
    # (a `tokenizer` folder of the same vocabulary, as in sft_args, is accepted: the other tests)


@pytest.mark.parametrize("given", ["run folder", "adapter folder"])
@pytest.mark.parametrize("key", ["model.path", "reference"])
def test_a_run_or_adapter_folder_given_as_a_model_names_the_model_inside(task, good_model, tmp_path, capsys,
                                                                         given, key):
    """A stage's output folder (its model is in model/) or its PEFT adapter/ folder given where a
    model folder belongs: the line names the key and the folder to give instead."""
    run = tmp_path / "run"
    shutil.copytree(good_model, run / "model")
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    folder = run if given == "run folder" else run / "adapter"
    paths = {"model.path": good_model, "reference": good_model, key: folder}
    result = run_cli(capsys, "dpo", f"output_dir={tmp_path / 'out'}", f"model.path={paths['model.path']}",
                     f"reference={paths['reference']}", f"data.train_files=[{task.preferences}]", *LENGTHS,
                     "train.batch_size=8")
    what = (f"a run's output folder, not a model folder: give `{key}` its exported model, {run / 'model'}"
            if given == "run folder" else
            f"a PEFT adapter folder, not a model folder: give `{key}` a model folder (a LoRA run exports the "
            f"merged model next to it, in {run / 'model'})")
    assert_one_error_line(*result, "dpo", "model", f"{folder}: {what}")


def reward_stage_args(stage: str, model, prompts, functions: str, tmp_path) -> list[str]:
    """Overrides of a grpo or eval run of `model` on `prompts` scored by `functions`."""
    args = ([f"policy.path={model}", f"data.train_files=[{prompts}]", *LENGTHS, "train.batch_size=2",
             "mesh.data=1"] if stage == "grpo" else [f"policies.a={model}", f"prompts_file={prompts}"])
    return [f"output_dir={tmp_path / 'out'}", f"reward.functions={functions}", *args]


@pytest.mark.parametrize("stage", ["grpo", "eval"])
def test_a_column_the_reward_function_needs_is_missing(task, good_model, tmp_path, capsys, stage):
    """Found before any sampling, naming the function, the column and the file."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1+2=", "id": 1}\n{"prompt": "2+2=", "id": 2}\n')
    functions = '[{function: "rlhf_jax.rewards:think_format"}, {function: "rlhf_jax.rewards:math_answer"}]'
    result = run_cli(capsys, stage, *reward_stage_args(stage, good_model, prompts, functions, tmp_path))
    assert_one_error_line(*result, stage, "reward", "reward function 'math_answer' needs the column 'answer'",
                          f"which {prompts} does not have (its columns besides 'prompt': id)")


def test_a_run_that_fails_at_start_up_leaves_the_earlier_config(task, good_model, tmp_path, capsys):
    """config.yaml is written when the loop starts: a start-up error (here a reward function's
    missing column) in an earlier run's folder leaves its config.yaml (and, with --resume, its
    config.<n>.yaml history) describing the steps that ran."""
    from rlhf_jax.pipeline.stage_configs import GRPOStageConfig, load_stage_config
    from rlhf_jax.pipeline.stages.stage_setup import prepare_output_dir

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1+2=", "id": 1}\n{"prompt": "2+2=", "id": 2}\n')
    good = reward_stage_args("grpo", good_model, prompts, '["rlhf_jax.rewards:think_format"]', tmp_path)
    bad = reward_stage_args("grpo", good_model, prompts, '["rlhf_jax.rewards:math_answer"]', tmp_path)
    prepare_output_dir(load_stage_config(GRPOStageConfig, None, good))  # the earlier run's record
    (tmp_path / "out" / "checkpoints" / "2").mkdir(parents=True)
    earlier = (tmp_path / "out" / "config.yaml").read_text()
    for resume in ([], ["--resume"]):
        result = run_cli(capsys, "grpo", *resume, *bad)
        assert_one_error_line(*result, "grpo", "reward", "reward function 'math_answer' needs the column 'answer'")
        assert (tmp_path / "out" / "config.yaml").read_text() == earlier
        assert not (tmp_path / "out" / "config.1.yaml").exists()


@pytest.mark.parametrize("stage", ["grpo", "eval"])
def test_a_column_the_reward_function_needs_is_null_in_one_row(task, good_model, tmp_path, capsys, stage):
    """Found before any sampling, naming the file and row (the function would get None)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1+2=", "answer": "3"}\n{"prompt": "2+2="}\n')
    functions = '[{function: "rlhf_jax.rewards:math_answer"}]'
    result = run_cli(capsys, stage, *reward_stage_args(stage, good_model, prompts, functions, tmp_path))
    assert_one_error_line(*result, stage, "reward", "reward function 'math_answer' needs the column 'answer', "
                          f"which is missing (or null) in {prompts} row 2")


def test_the_default_gold_scorer_on_prompts_of_another_task_is_refused_before_sampling(
        task, good_model, tmp_path, capsys):
    """The gold scorer (the default without `reward.path`) scores the built-in task's
    prompts; other prompts without an `answer` to compare with are named, with the keys that
    score them instead."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1+2="}\n{"prompt": "12=3"}\n')
    result = run_cli(capsys, "grpo", f"output_dir={tmp_path / 'out'}", f"policy.path={good_model}",
                     f"data.train_files=[{prompts}]", *LENGTHS, "train.batch_size=2", "mesh.data=1")
    assert_one_error_line(*result, "grpo", "reward", "the arithmetic task's gold scorer (the default without "
                          f"`reward.path`) cannot score {prompts} row 2:", "`reward.functions`", "`answer`")
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_setting_another_reward_key_keeps_the_gold_scorer(task, good_model, tmp_path, capsys, stage):
    """Without `reward.path`, `reward.gold_kind` / `reward.task` leave the scorer at gold
    (auto): the run reaches the gold scorer's check of the prompts, not a reward model."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1+2="}\n{"prompt": "12=3"}\n')
    result = run_cli(capsys, stage, f"output_dir={tmp_path / 'out'}", f"policy.path={good_model}",
                     f"data.train_files=[{prompts}]", *LENGTHS, "train.batch_size=2", "mesh.data=1",
                     f"{stage}.num_minibatches=1", "reward.gold_kind=graded", "reward.task=arithmetic")
    assert_one_error_line(*result, stage, "reward", "the arithmetic task's gold scorer (the default without "
                          f"`reward.path`) cannot score {prompts} row 2:")


def test_a_reward_model_kind_without_its_folder_is_refused(task, good_model, tmp_path, capsys):
    result = run_cli(capsys, "grpo", f"output_dir={tmp_path / 'out'}", f"policy.path={good_model}",
                     f"data.train_files=[{task.prompts}]", *LENGTHS, "train.batch_size=2", "mesh.data=1",
                     "reward.kind=reward_model")
    assert_one_error_line(*result, "grpo", "config", "`reward.kind: reward_model` needs `reward.path`")
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_rewards_that_never_apply_are_one_warning_line(task, good_model, tmp_path, capsys):
    """Training goes on (exit 0); stderr holds one `warning:` line, once, and nothing else."""
    rewards = tmp_path / "never.py"
    rewards.write_text("def never(completions, **kwargs):\n    return [None] * len(completions)\n")
    code, lines, err = run_cli(capsys, "grpo", f"output_dir={tmp_path / 'out'}", f"policy.path={good_model}",
                               f"data.train_files=[{task.prompts}]", *LENGTHS, *QUIET, "train.batch_size=2",
                               "train.iterations=2",
                               "grpo.group_size=2", "grpo.sampling.max_new_tokens=2",
                               f"reward.functions=[{{function: {rewards}:never}}]")
    assert code == 0, err
    assert lines == ["warning: every reward function (never) returned None for all 4 completions of a batch: their "
                     "scores are 0 and the update learns nothing from them (None means 'does not apply'); check "
                     "that the functions apply to these prompts (reward/unscored_fraction in the metrics)"], err


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_fewer_rows_than_one_batch_names_the_batch_size(task, good_model, tmp_path, capsys, stage):
    rows = tmp_path / "rows.jsonl"
    if stage == "sft":
        rows.write_text('{"prompt": "1+2=", "completion": "3"}\n' * 5)
        args = sft_args(task, tmp_path / "out", f"data.train_files=[{rows}]", "train.batch_size=64")
        culprits = ["`train.batch_size` (64) is more than the 5 rows of", "`data.drop_last: false`"]
    else:
        rows.write_text('{"prompt": "1+2="}\n' * 5)
        args = ["grpo", f"output_dir={tmp_path / 'out'}", f"policy.path={good_model}", f"data.train_files=[{rows}]",
                *LENGTHS, "train.batch_size=64", 'reward.functions=[{function: "rlhf_jax.rewards:think_format"}]']
        culprits = ["`train.batch_size` (64) is more than the 5 prompts of"]
    result = run_cli(capsys, *args)
    assert_one_error_line(*result, stage, "config", *culprits, f"{rows}; set it to at most 5")


@pytest.mark.parametrize("breakage", ["missing", "corrupt tokenizer.json"])
def test_broken_tokenizer_folder(task, tmp_path, capsys, breakage):
    folder = tmp_path / "tokenizer"
    if breakage == "corrupt tokenizer.json":
        shutil.copytree(task.tokenizer_dir, folder)
        (folder / "tokenizer.json").write_bytes(b'{"version": "1.0", "added_tok')
    args = sft_args(task, tmp_path / "out")
    args = [arg for arg in args if not arg.startswith("tokenizer=")] + [f"tokenizer={folder}"]
    result = run_cli(capsys, *args)
    what = "tokenizer folder not found" if breakage == "missing" else "no readable tokenizer"
    assert_one_error_line(*result, "sft", "model", f"{folder}: {what}")


# ----------------------------------------------------------------------------- data files


def _latin1_jsonl(path):
    path.write_bytes(b'{"prompt": "1+2=", "completion": "3"}\n' + '{"prompt": "é", "completion": "3"}\n'.encode("latin-1"))
    return "row 2", "not valid UTF-8"


def _latin1_json(path):
    path.write_bytes(b'[{"prompt": "1+2=", "completion": "3"},\n {"prompt": "\xe9", "completion": "3"}]')
    return "line 2", "not valid UTF-8"


def _binary_jsonl(path):
    path.write_bytes(bytes([0xFF]) + os.urandom(400))
    return "row 1", "byte 0xff at offset 0 is not valid UTF-8"


def _bad_parquet(path):
    raw = pa.array([b"1+2=", b"\xff"], type=pa.binary())
    prompts = pa.Array.from_buffers(pa.string(), 2, raw.buffers())
    pq.write_table(pa.table({"prompt": prompts, "completion": pa.array(["3", "4"])}), path)
    return "row 2", "column 'prompt' is not valid UTF-8"


DATA_BREAKAGES = {"latin1.jsonl": _latin1_jsonl, "latin1.json": _latin1_json, "binary.jsonl": _binary_jsonl,
                  "invalid.parquet": _bad_parquet}


@pytest.mark.parametrize("name", list(DATA_BREAKAGES))
def test_data_that_is_not_utf8(task, tmp_path, capsys, name):
    path = tmp_path / name
    where, what = DATA_BREAKAGES[name](path)
    result = run_cli(capsys, *sft_args(task, tmp_path / "out", f"data.train_files=[{path}]"))
    assert_one_error_line(*result, "sft", "data", f"{path}", where, what)


# ----------------------------------------------------------------------------- output directories


@pytest.mark.parametrize("where", ["is a file", "under a file", "checkpoints is a file", "disk full"])
def test_output_dir_that_cannot_be_written(task, tmp_path, capsys, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    output_dir, culprit = {"is a file": (blocker, blocker), "under a file": (blocker / "run", blocker / "run"),
                           "checkpoints is a file": (tmp_path / "run", tmp_path / "run" / "checkpoints"),
                           "disk full": (tmp_path / "run", tmp_path / "run" / "config.yaml")}[where]
    if where == "checkpoints is a file":
        output_dir.mkdir()
        (output_dir / "checkpoints").write_text("")
    if where == "disk full":  # the first write goes to /dev/full, which answers ENOSPC
        if not os.path.exists("/dev/full"):
            pytest.skip("no /dev/full on this system")
        output_dir.mkdir()
        (output_dir / "config.yaml").symlink_to("/dev/full")
    code, lines, err = run_cli(capsys, *sft_args(task, output_dir))
    assert_one_error_line(code, lines, err, "sft", "output", "`output_dir`", culprit)
    if where == "disk full":
        assert "No space left on device" in lines[0]


SOURCE_FOLDER_CASES = {  # stage, the key whose folder output_dir is in, its override, other arguments
    "sft model.path": ("sft", "model.path", "model.path={}", lambda task, good: [f"tokenizer={task.tokenizer_dir}"]),
    "sft tokenizer": ("sft", "tokenizer", "tokenizer={}", lambda task, good: [f"model.path={good}"]),
    "dpo reference": ("dpo", "reference", "reference={}", lambda task, good: [f"model.path={good}"]),
    "ppo reward.path": ("ppo", "reward.path", "reward.path={}", lambda task, good: [f"policy.path={good}"]),
    "grpo policy.path": ("grpo", "policy.path", "policy.path={}", lambda task, good: []),
    "eval policies.sft": ("eval", "policies.sft", "policies={{sft: {}}}", lambda task, good: []),
}


@pytest.mark.parametrize("where", ["the folder", "inside it", "a link to it"])
@pytest.mark.parametrize("case", list(SOURCE_FOLDER_CASES))
def test_output_dir_in_a_source_model_folder_is_refused(task, good_model, tmp_path, capsys, case, where):
    """A run would write checkpoints/, model/ and its logs into the user's model folder."""
    stage, key, override, others = SOURCE_FOLDER_CASES[case]
    source = tmp_path / "source"
    shutil.copytree(good_model, source)
    before = sorted(path.name for path in source.iterdir())
    output_dir = {"the folder": source, "inside it": source / "runs" / "x", "a link to it": tmp_path / "link"}[where]
    if where == "a link to it":
        output_dir.symlink_to(source)
    result = run_cli(capsys, stage, f"output_dir={output_dir}", override.format(source), *others(task, good_model))
    assert_one_error_line(*result, stage, "output", f"`output_dir` ({output_dir})", f"`{key}` ({source})")
    assert sorted(path.name for path in source.iterdir()) == before  # nothing written there


def test_output_dir_next_to_or_above_a_source_folder_passes(tmp_path):
    from rlhf_jax.pipeline.stages.stage_setup import check_output_dir

    check_output_dir({"output_dir": str(tmp_path / "models" / "run"),
                      "model": {"path": str(tmp_path / "models" / "base")}})
    check_output_dir({"output_dir": str(tmp_path), "policies": {"sft": str(tmp_path / "sft" / "model")}})


def test_a_source_folder_the_run_replaces_is_refused(task, good_model, tmp_path, capsys):
    """`model.path=<run>/model` with `output_dir=<run>` would overwrite the model it trains
    from at export; eval (which writes no model) may read a policy there."""
    from rlhf_jax.pipeline.stages.stage_setup import check_output_dir

    run = tmp_path / "run"
    shutil.copytree(good_model, run / "model")
    before = sorted(path.name for path in (run / "model").iterdir())
    result = run_cli(capsys, "sft", f"output_dir={run}", f"model.path={run / 'model'}")
    assert_one_error_line(*result, "sft", "output", f"`model.path` ({run / 'model'}) is in the `model/` folder of "
                          f"`output_dir` ({run}), which this run replaces")
    assert sorted(path.name for path in (run / "model").iterdir()) == before
    check_output_dir({"output_dir": str(run), "policies": {"a": str(run / "model")}})


def test_config_file_that_is_not_utf8(tmp_path, capsys):
    config = tmp_path / "sft.yaml"
    config.write_bytes(b"output_dir: runs/caf\xe9\n")
    result = run_cli(capsys, "sft", "--config", config)
    assert_one_error_line(*result, "sft", "config", f"{config}: byte 0xe9 at offset 20 is not valid UTF-8")


# ----------------------------------------------------------------------------- checkpoints and NaN


def _truncate_file(path):
    with open(path, "r+b") as file:
        file.truncate(4)


@pytest.mark.slow
def test_damaged_checkpoints_on_resume(task, tmp_path, capsys):
    """(Truncated array data is resumed past in the subprocess test below.)"""
    out = tmp_path / "run"
    args = sft_args(task, out, "checkpoint.interval=2")
    assert run_cli(capsys, *args, "train.stop_after=4")[0] == 0
    checkpoints = out / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["2", "4"]
    _truncate_file(checkpoints / "4" / "state" / "_sharding")  # orbax: FAILED_PRECONDITION ... Invalid JSON

    code, lines, err = run_cli(capsys, *args, "--resume")
    assert code == 0 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("warning: unreadable checkpoint step 4 ("), err
    assert "Invalid JSON" in lines[0] and str(checkpoints) in lines[0] and "resuming from step 2" in lines[0]
    assert (checkpoints / "4.unreadable").is_dir() and (checkpoints / "4").is_dir()  # step 4 written again
    assert [row["step"] for row in read_metrics(out)] == [1, 2, 3, 4] and (out / "model").is_dir()

    for step in ("2", "4"):
        _truncate_file(checkpoints / step / "meta" / "metadata")
    result = run_cli(capsys, *args, "--resume")
    assert_one_error_line(*result, "sft", "checkpoint", f"no readable checkpoint in {checkpoints}", "step 4: ",
                          "step 2: ")


@pytest.fixture(scope="module")
def overflowing_model(good_model, tmp_path_factory):
    """The good policy with a final-norm scale of 3e38: finite weights whose logits overflow,
    so every loss and gradient is NaN/inf."""
    folder = tmp_path_factory.mktemp("overflow") / "model"
    shutil.copytree(good_model, folder)
    edit_tensors(lambda t: t["model.norm.weight"].fill(3e38))(folder)
    return folder


@pytest.mark.slow
def test_nonfinite_gradients_skip_then_stop_and_nothing_nonfinite_is_written(task, overflowing_model, tmp_path,
                                                                            capsys):
    out = tmp_path / "skip"
    result = run_cli(capsys, *sft_args(task, out, f"model.path={overflowing_model}",
                                       "optim.max_consecutive_skips=3", "checkpoint.interval=1"))
    assert_one_error_line(*result, "sft", "training", "sft: stopped at step 3: 3 optimizer updates in a row",
                          "optim.max_consecutive_skips = 3", "the latest checkpoint is step 2")
    rows = read_metrics(out)
    assert [row["optim/nonfinite_skips"] for row in rows] == [1, 2, 3]
    assert sorted(os.listdir(out / "checkpoints")) == ["1", "2"] and not (out / "model").exists()

    out = tmp_path / "none"  # no skipping: the first update writes NaN into the parameters
    result = run_cli(capsys, *sft_args(task, out, f"model.path={overflowing_model}", "optim.nonfinite=none",
                                       "checkpoint.interval=1"))
    assert_one_error_line(*result, "sft", "training", "refusing to write the checkpoint of step 1: NaN or inf",
                          "the latest checkpoint stays none")
    assert not os.listdir(out / "checkpoints")


# ----------------------------------------------------------------------------- the real command


@pytest.mark.slow
def test_the_command_line_in_a_subprocess(task, good_model, tmp_path, capsys):
    """`python -m rlhf_jax.pipeline.cli` (the three commands run side by side): a broken model
    folder, a non-UTF-8 data file, and `--resume` past a checkpoint whose array data was cut
    short (orbax abandons that checkpoint's other reads; their asyncio tracebacks must not
    reach stderr)."""
    folder = broken_copy(good_model, tmp_path / "policy", "truncated safetensors")
    data = tmp_path / "latin1.jsonl"
    _latin1_jsonl(data)
    resumed = sft_args(task, tmp_path / "resume", "checkpoint.interval=2")
    assert run_cli(capsys, *resumed, "train.stop_after=4")[0] == 0
    for path in (tmp_path / "resume" / "checkpoints" / "4" / "state").glob("**/d/*"):
        _truncate_file(path)
    commands = {"model": sft_args(task, tmp_path / "model", f"model.path={folder}"),
                "data": sft_args(task, tmp_path / "data", f"data.train_files=[{data}]"),
                "resume": [*resumed, "--resume"]}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    processes = {kind: subprocess.Popen([sys.executable, "-m", "rlhf_jax.pipeline.cli", *map(str, args)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
                 for kind, args in commands.items()}
    stderr = {kind: process.communicate(timeout=600)[1] for kind, process in processes.items()}
    lines = {kind: [line for line in text.splitlines() if line.strip()] for kind, text in stderr.items()}
    assert_one_error_line(processes["model"].returncode, lines["model"], stderr["model"], "sft", "model",
                          f"{folder}: model.safetensors: truncated")
    assert_one_error_line(processes["data"].returncode, lines["data"], stderr["data"], "sft", "data", f"{data} row 2")
    assert processes["resume"].returncode == 0, stderr["resume"]
    assert len(lines["resume"]) == 1 and lines["resume"][0].startswith("warning: unreadable checkpoint step 4 ("), \
        stderr["resume"]
