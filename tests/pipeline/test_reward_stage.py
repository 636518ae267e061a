"""Your own task through `rlhf-jax grpo` / `ppo`: a folder with prompts.jsonl and a reward file."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from stage_helpers import sft_overrides, tiny_task

from rlhf_jax.pipeline import cli
from rlhf_jax.pipeline.metrics_log import read_metrics
from rlhf_jax.pipeline.stages import sft

REWARD_FILE = '''
def correct(prompts, completions, answer, **kwargs):
    """1 for the right sum, else 0."""
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


def starts_right(completions, **kwargs):
    """TRL style: only **kwargs; None (does not apply) for one-digit answers."""
    return [None if len(a) == 1 else float(c[:1] == a[:1]) for c, a in zip(completions, kwargs["answer"])]
'''

BAD_FUNCTIONS = {
    "raises": ("def f(prompts, completions, **kw):\n    raise KeyError('answer2')\n",
               r"reward function 'f' raised KeyError: 'answer2' \(at .*my_reward.py line 2\)"),
    "wrong_length": ("def f(prompts, completions, **kw):\n    return [0.0]\n",
                     r"reward function 'f' returned 1 values for 4 completions"),
    "non_number": ("def f(prompts, completions, **kw):\n    return ['high'] * len(completions)\n",
                   r"reward function 'f' returned a str \('high'\) for row 0 \(.*prompts.jsonl row \d+\)"),
    "nan": ("def f(prompts, completions, **kw):\n    return [float('nan')] * len(completions)\n",
            r"reward function 'f' returned nan for row 0 \(.*prompts.jsonl row \d+\)"),
    "import": ("import a_module_that_is_not_installed\ndef f(prompts, completions, **kw):\n    return []\n",
               r"reward function 'my_reward.py:f': cannot import my_reward.py: ModuleNotFoundError"),
    "log_extra": ("def f(completions, log_extra, **kw):\n    return [0.0] * len(completions)\n",
                  r"reward function 'f' needs TRL's trainer argument 'log_extra', which rlhf-jax grpo does not "
                  r"pass \(it keeps no completions table\); give it a default \(log_extra=None\)"),
    "log_metric_name": ("def f(completions, log_metric, **kw):\n    log_metric('grpo/loss', 1.0)\n"
                        "    return [0.0] * len(completions)\n",
                        r"reward function 'f': log_metric\('grpo/loss', ...\) would overwrite a metric the stage logs"),
}


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A tiny SFT model of the built-in addition task (its tokenizer knows digits, + and =)."""
    task = tiny_task(tmp_path_factory.mktemp("task"))
    out = tmp_path_factory.mktemp("sft")
    sft.run(None, sft_overrides(task, out, steps=30))
    return out / "model"


def user_folder(folder, reward_source: str):
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in
            [(1, 2), (3, 4), (12, 5), (7, 7), (20, 31), (8, 9), (40, 2), (6, 13)]]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "my_reward.py").write_text(reward_source)


def grpo_args(policy, functions: str, *extra: str) -> list[str]:
    return ["grpo", "output_dir=run", f"policy.path={policy}", "data.train_files=[prompts.jsonl]",
            "data.max_prompt_length=8", "logging.progress=false", "logging.tensorboard=false", "mesh.data=1",
            "train.batch_size=2", "grpo.group_size=2", "grpo.sampling.max_new_tokens=4", "checkpoint.interval=0",
            f"reward.functions={functions}", *extra]


@pytest.mark.slow
def test_a_user_folder_runs_grpo_with_its_reward_functions(policy, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    user_folder(tmp_path, REWARD_FILE)
    functions = ("[{function: my_reward.py:correct, weight: 1.0}, {function: my_reward.py:starts_right, "
                 "weight: 0.5}, {function: 'rlhf_jax.rewards:think_format', weight: 0.1}]")
    assert cli.main(grpo_args(policy, functions, "train.iterations=3", "grpo.sampling.temperature=1.0",
                              "dynamic_sampling.enabled=true", "dynamic_sampling.max_refills=2",
                              "mask_truncated=true")) == 0
    out = capsys.readouterr().out
    assert "prompts: 8 rows of 8" in out and "columns: prompt, answer" in out
    assert "correct (weight 1)" in out and "starts_right (weight 0.5)" in out
    assert "[grpo] step 3/3" in out and "reward/correct/mean" in out  # a line per logged step
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 3
    for row in rows:
        assert 0.0 <= row["reward/correct/mean"] <= 1.0 and "reward/correct/std" in row
        assert row["reward/think_format/mean"] == 0.0
        assert 0 <= row["dynamic_sampling/refills"] <= 2
        assert np.isfinite(row["grpo/loss"])
    assert any("reward/starts_right/mean" in row for row in rows)


@pytest.mark.parametrize("case", sorted(BAD_FUNCTIONS))
def test_each_bad_reward_function_is_one_line_and_exit_2(policy, tmp_path, monkeypatch, capsys, case):
    monkeypatch.chdir(tmp_path)
    source, message = BAD_FUNCTIONS[case]
    user_folder(tmp_path, source)
    assert cli.main(grpo_args(policy, "[{function: my_reward.py:f}]", "train.iterations=1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rlhf-jax grpo: reward error: ")
    assert re.search(message, err[0]), err[0]


TRAINER_ARGUMENTS_FILE = '''
def curriculum(completions, trainer_state, log_metric, **kwargs):
    """TRL's trainer arguments: the step so far and a metric of the function's own."""
    log_metric("curriculum/step", trainer_state.global_step)
    log_metric("curriculum/max_steps", trainer_state.max_steps)
    log_metric("curriculum/batch", len(completions))
    return [float(trainer_state.global_step)] * len(completions)
'''


def test_trl_trainer_arguments_reach_reward_functions(policy, tmp_path, monkeypatch):
    """`trainer_state.global_step` counts the optimizer steps before each rollout (2 per
    iteration here) out of `max_steps`; what `log_metric` logs is a metric of the row."""
    monkeypatch.chdir(tmp_path)
    user_folder(tmp_path, TRAINER_ARGUMENTS_FILE)
    assert cli.main(grpo_args(policy, "[my_reward.py:curriculum]", "train.iterations=2", "grpo.epochs=2",
                              "grpo.kl_coef=0")) == 0
    rows = read_metrics(tmp_path / "run")
    assert [row["curriculum/step"] for row in rows] == [0.0, 2.0]
    assert [row["objective/scores"] for row in rows] == [0.0, 2.0]
    assert all(row["curriculum/max_steps"] == 4.0 and row["curriculum/batch"] == 4.0 for row in rows)


@pytest.mark.slow
def test_ppo_with_reward_functions(policy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    user_folder(tmp_path, REWARD_FILE)
    args = ["ppo", "output_dir=run", f"policy.path={policy}", "data.train_files=[prompts.jsonl]",
            "data.max_prompt_length=8", "logging.progress=false", "logging.tensorboard=false", "mesh.data=1",
            "train.batch_size=4", "train.iterations=2", "ppo.sampling.max_new_tokens=4", "ppo.num_minibatches=2",
            "ppo.epochs=1", "checkpoint.interval=0", "reward.functions=[my_reward.py:correct]"]
    assert cli.main(args) == 0
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 2 and "reward/correct/mean" in rows[0] and "value/loss" in rows[0]


def test_eval_with_reward_functions_replaces_the_gold_scorer(policy, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    user_folder(tmp_path, REWARD_FILE + "\n\ndef always(prompts, completions, **kw):\n"
                "    return [1.0] * len(completions)\n")
    args = ["eval", "output_dir=run", f"policies={{a: {policy}}}", "prompts_file=prompts.jsonl", "num_samples=2",
            "max_new_tokens=4", "batch_size=16", "report=false", "preferences_file=prompts.jsonl",
            "reward.functions=[{function: my_reward.py:always, weight: 0.25}, {function: my_reward.py:correct}]"]
    assert cli.main(args) == 0
    # without a reward model the held-out pairs are not read, and the run says so
    assert "warning: `preferences_file` gives the reward model's held-out accuracy and is not read without " \
           "`reward_model`" in capsys.readouterr().err
    a = json.loads((tmp_path / "run" / "results.json").read_text())["policies"]["a"]
    assert a["reward/always/mean"] == 1.0 and a["reward"] == pytest.approx(0.25 + a["reward/correct/mean"])
    assert a["pass@1"] == pytest.approx(a["reward/correct/mean"])  # passes: 0.25 + 1 > 0.5 only when correct


@pytest.mark.slow
def test_grpo_raises_a_user_reward_the_sft_model_does_not_seek(policy, tmp_path, monkeypatch):
    """A reward only the user's file knows (answers that start with 9) rises under GRPO."""
    monkeypatch.chdir(tmp_path)
    user_folder(tmp_path, "def starts_with_9(completions, **kwargs):\n"
                          "    return [float(c.strip()[:1] == '9') for c in completions]\n")
    args = grpo_args(policy, "[{function: my_reward.py:starts_with_9}]", "train.iterations=40",
                     "train.batch_size=4", "grpo.group_size=4", "grpo.sampling.temperature=1.0",
                     "optim.learning_rate=0.01", "optim.warmup_steps=0", "grpo.kl_coef=0.0")
    assert cli.main(args) == 0
    rewards = [row["reward/starts_with_9/mean"] for row in read_metrics(tmp_path / "run")]
    assert len(rewards) == 40
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    assert last > first + 0.4, rewards
