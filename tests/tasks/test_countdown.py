"""Countdown: deterministic generation, held-out problems, and the reward (each number once,
value equal to the target)."""
import json
from fractions import Fraction

import pytest

from rlhf_jax.pipeline.tasks import load_task
from rlhf_jax.tasks.countdown import (TaskConfig, build_task, correct, corrupt_expression, countdown_reward,
                                      evaluate_expression, make_splits, parse_prompt)
import numpy as np

SMALL = TaskConfig(seed=2, num_sft=200, num_preferences=40, num_prompts=50, num_eval_prompts=30,
                   num_eval_preferences=10)


@pytest.mark.parametrize("completion, reward", [
    ("3*5+7<eos>", 1.0), ("7+3*5<eos>", 1.0), ("(7+5*3)<eos>", 1.0),   # any order, any valid form
    ("3*5+7", 0.0),                                  # no EOS: did not stop
    ("3*5+7+0<eos>", 0.0),                          # a number not given
    ("3*5*1+7<eos>", 0.0),
    ("15+7<eos>", 0.0),                             # numbers not the given ones
    ("3*5-7<eos>", 0.0),                            # wrong value
    ("3*5+7+3-3<eos>", 0.0),                        # a number used twice
    ("3*(5+7<eos>", 0.0),                           # not an expression
    ("__import__('os')<eos>", 0.0),
])
def test_reward_cases(completion, reward):
    assert countdown_reward("3 5 7>22:", completion) == reward


def test_division_is_exact_and_graded_kind():
    assert countdown_reward("6 3 4>8:", "6/3*4<eos>") == 1.0
    assert countdown_reward("6 4 3>8:", "6/(4-3)<eos>") == 0.0
    assert countdown_reward("3 5 7>22:", "3+5+7<eos>", kind="graded") == 0.1
    assert countdown_reward("3 5 7>22:", "3+5", kind="graded") == -1.0
    assert evaluate_expression("1/0") is None and evaluate_expression("7/2") == (Fraction(7, 2), [7, 2])
    assert parse_prompt("<|user|>9 1 3>7:<|assistant|>") == ([9, 1, 3], 7)


def test_splits_are_deterministic_valid_and_held_out(tmp_path):
    files = build_task(tmp_path / "a", SMALL)
    again = build_task(tmp_path / "b", SMALL)
    for name in ("sft", "preferences", "prompts", "eval_prompts", "eval_preferences"):
        assert getattr(files, name).read_bytes() == getattr(again, name).read_bytes()
    splits = make_splits(SMALL)
    for row in splits["eval_prompts"] + splits["prompts"]:
        assert countdown_reward(row["prompt"], row["answer"], require_eos=False) == 1.0
    rewards = [countdown_reward(r["prompt"], r["completion"], require_eos=False) for r in splits["sft"]]
    assert 0.45 < np.mean(rewards) < 0.75  # sft_noise_rate 0.4 of corrupted demonstrations
    for row in splits["preferences"]:
        assert countdown_reward(row["prompt"], row["chosen"], require_eos=False, kind="graded") > \
            countdown_reward(row["prompt"], row["rejected"], require_eos=False, kind="graded")
    key = lambda row: (tuple(sorted(parse_prompt(row["prompt"])[0])), parse_prompt(row["prompt"])[1])
    held_out = {key(r) for r in splits["eval_prompts"] + splits["eval_preferences"]}
    assert not held_out & {key(r) for r in splits["sft"] + splits["prompts"] + splits["preferences"]}
    assert json.loads(files.config.read_text())["num_numbers"] == 3


@pytest.mark.parametrize("kind", ["op", "number", "drop"])
def test_corruptions_never_score(kind):
    rng = np.random.default_rng(0)
    for numbers, text in [([3, 5, 7], "3*5+7"), ([4, 3, 4], "(4-3)*4"), ([9, 2, 9], "9*2-9")]:
        target = int(evaluate_expression(text)[0])
        wrong = corrupt_expression(rng, numbers, text, kind)
        assert countdown_reward(f"{' '.join(map(str, numbers))}>{target}:", wrong, require_eos=False) == 0.0


def test_the_task_interface_and_reward_function():
    task = load_task("countdown")
    assert task.name == "countdown" and task.make_config({"num_numbers": 4}).num_numbers == 4
    assert task.reward("3 5 7>22:", "7+5*3<eos>", answer="3*5+7", eos_token="<eos>") == 1.0
    assert correct(["3 5 7>22:", "3 5 7>22:"], ["3*5+7", "3+5+7"]) == [1.0, 0.0]
