"""The built-in addition task: deterministic generation, held-out splits and the gold scorer."""
import dataclasses
import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax.typed_config import ConfigError, load_config
from rlhf_jax.pipeline.data import DataConfig, load_data
from rlhf_jax.tasks.arithmetic import (
    CORRUPTIONS,
    TaskConfig,
    build_task,
    corrupt_answer,
    gold_reward,
    gold_rewards,
    make_splits,
    parse_problem,
)
from rlhf_jax.pipeline.tokenizer import load_tokenizer

SMALL = TaskConfig(
    seed=3, num_sft=300, num_preferences=200, num_prompts=100, num_eval_prompts=40, num_eval_preferences=40
)
FILES = ("sft", "preferences", "prompts", "eval_prompts", "eval_preferences")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def operands(prompt):
    a, b = re.fullmatch(r"(\d+)\+(\d+)=", prompt).groups()
    return int(a), int(b)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return build_task(tmp_path_factory.mktemp("task"), SMALL)


# ----------------------------------------------------------------------------- generation


def test_same_seed_writes_identical_files(task, tmp_path):
    again = build_task(tmp_path, SMALL)
    for name in FILES + ("config",):
        assert getattr(task, name).read_bytes() == getattr(again, name).read_bytes(), name
    for file in ("tokenizer.json", "tokenizer_config.json"):
        assert (task.tokenizer_dir / file).read_bytes() == (again.tokenizer_dir / file).read_bytes()


def test_other_seed_differs():
    first = make_splits(SMALL)
    second = make_splits(dataclasses.replace(SMALL, seed=4))
    for name in FILES:
        assert first[name] != second[name], name


def test_changing_one_split_size_keeps_the_others():
    base = make_splits(SMALL)
    bigger = make_splits(dataclasses.replace(SMALL, num_sft=500))
    assert bigger["sft"][:300] != [] and len(bigger["sft"]) == 500
    for name in ("prompts", "eval_prompts", "eval_preferences", "preferences"):
        assert bigger[name] == base[name], name


def test_split_sizes_and_fields(task):
    sizes = {"sft": 300, "preferences": 200, "prompts": 100, "eval_prompts": 40, "eval_preferences": 40}
    fields = {
        "sft": {"prompt", "completion"},
        "preferences": {"prompt", "chosen", "rejected"},
        "prompts": {"prompt"},
        "eval_prompts": {"prompt", "answer"},
        "eval_preferences": {"prompt", "chosen", "rejected"},
    }
    for name in FILES:
        rows = read_jsonl(getattr(task, name))
        assert len(rows) == sizes[name], name
        assert all(set(row) == fields[name] for row in rows), name
    assert json.loads(task.config.read_text())["seed"] == 3


def test_operands_respect_digit_range():
    config = dataclasses.replace(SMALL, min_digits=2, max_digits=3)
    for row in make_splits(config)["prompts"]:
        for operand in operands(row["prompt"]):
            assert 10 <= operand <= 999
    one_digit = dataclasses.replace(SMALL, max_digits=1, num_eval_prompts=10, num_eval_preferences=10)
    for row in make_splits(one_digit)["sft"]:
        assert all(0 <= operand <= 9 for operand in operands(row["prompt"]))


def test_held_out_problems_never_appear_in_training(task):
    held_out = {row["prompt"] for row in read_jsonl(task.eval_prompts) + read_jsonl(task.eval_preferences)}
    assert len({row["prompt"] for row in read_jsonl(task.eval_prompts)}) == 40  # distinct
    for name in ("sft", "preferences", "prompts"):
        assert not held_out & {row["prompt"] for row in read_jsonl(getattr(task, name))}, name


def test_eval_answers_are_the_sums(task):
    for row in read_jsonl(task.eval_prompts):
        a, b = operands(row["prompt"])
        assert row["answer"] == str(a + b)


def test_sft_noise_rate_is_respected():
    for rate in (0.0, 0.3):
        rows = make_splits(dataclasses.replace(SMALL, num_sft=2000, sft_noise_rate=rate))["sft"]
        wrong = np.mean([row["completion"] != str(sum(operands(row["prompt"]))) for row in rows])
        assert abs(wrong - rate) < 0.04, (rate, wrong)


@pytest.mark.parametrize("reward", ["exact", "graded"])
def test_preference_pairs_are_ordered_by_the_gold_scorer(reward):
    config = dataclasses.replace(SMALL, preference_reward=reward)
    splits = make_splits(config)
    for name in ("preferences", "eval_preferences"):
        for row in splits[name]:
            a, b = operands(row["prompt"])
            if reward == "exact":
                assert row["chosen"] == str(a + b) and row["rejected"] != str(a + b)
            chosen = gold_reward(row["prompt"], row["chosen"], kind=reward, require_eos=False)
            rejected = gold_reward(row["prompt"], row["rejected"], kind=reward, require_eos=False)
            assert chosen > rejected


def test_conversational_format_loads_through_the_data_code(tmp_path):
    files = build_task(tmp_path, dataclasses.replace(SMALL, format="conversational"))
    assert read_jsonl(files.sft)[0]["messages"][1]["role"] == "assistant"
    tokenizer = load_tokenizer(files.tokenizer_dir)
    config = DataConfig(max_prompt_length=24, max_response_length=12)
    kinds = {"sft": "sft", "preferences": "preference", "prompts": "prompt", "eval_prompts": "prompt"}
    for name, kind in kinds.items():
        data = load_data(getattr(files, name), tokenizer, config, cache_dir=str(tmp_path / "cache"))
        assert data.kind == kind and len(data) == len(read_jsonl(getattr(files, name)))
        assert data.columns["prompt_text"][0].endswith("=<|assistant|>")
    eval_prompts = load_data(files.eval_prompts, tokenizer, config, cache_dir=str(tmp_path / "cache"))
    completions = [answer + "<eos>" for answer in eval_prompts.columns["answer"]]
    scores = gold_rewards(eval_prompts.columns["prompt_text"], completions)
    assert scores.tolist() == [1.0] * len(eval_prompts)


def test_string_files_load_through_the_data_code(task, tmp_path):
    tokenizer = load_tokenizer(task.tokenizer_dir)
    config = DataConfig(max_prompt_length=12, max_response_length=12)
    for name in FILES:
        data = load_data(getattr(task, name), tokenizer, config, cache_dir=str(tmp_path / "cache"))
        assert data.stats.num_used == len(read_jsonl(getattr(task, name))) and data.stats.num_skipped == 0


@pytest.mark.parametrize(
    "change, field",
    [
        ({"min_digits": 0}, "min_digits"),
        ({"min_digits": 3, "max_digits": 2}, "max_digits"),
        ({"num_sft": -1}, "num_sft"),
        ({"sft_noise_rate": 1.5}, "sft_noise_rate"),
        ({"preference_noise_rate": 0.0}, "preference_noise_rate"),
        ({"preference_reward": "close"}, "preference_reward"),
        ({"format": "xml"}, "format"),
        ({"corruptions": ("typo",)}, "corruptions"),
        ({"max_digits": 1, "num_eval_prompts": 60}, "held-out"),
    ],
)
def test_bad_config_raises(change, field):
    with pytest.raises(ValueError, match=field):
        make_splits(dataclasses.replace(SMALL, **change))


# ----------------------------------------------------------------------------- corruptions


@settings(max_examples=30, deadline=None)
@given(
    a=st.integers(0, 999), b=st.integers(0, 999), kind=st.sampled_from(CORRUPTIONS), seed=st.integers(0, 99)
)
def test_corruption_is_always_wrong(a, b, kind, seed):
    wrong = corrupt_answer(np.random.default_rng(seed), a, b, kind)
    assert wrong != str(a + b) and wrong != ""
    assert gold_reward(f"{a}+{b}=", wrong + "<eos>") == 0.0


def test_corruption_kinds():
    rng = np.random.default_rng(0)
    assert corrupt_answer(rng, 58, 67, "no_carry") == "15"  # 5+6=11 -> 1, 8+7=15 -> 5
    assert corrupt_answer(rng, 300, 57, "off_by_one") in {"347", "356", "358", "367"}
    assert corrupt_answer(rng, 300, 57, "drop") in {"57", "37", "35"}
    assert corrupt_answer(rng, 300, 57, "extra").startswith("357")
    digit = corrupt_answer(rng, 300, 57, "digit")
    assert len(digit) == 3 and sum(x != y for x, y in zip(digit, "357")) == 1
    with pytest.raises(ValueError, match="corruption"):
        corrupt_answer(rng, 1, 2, "typo")


# ----------------------------------------------------------------------------- gold scorer


@pytest.mark.parametrize(
    "completion, exact, graded",
    [
        ("357<eos>", 1.0, 1.0),
        ("357<eos><pad><pad>", 1.0, 1.0),  # text after EOS is ignored
        ("357<eos>12", 1.0, 1.0),
        ("357", 0.0, -1.0),  # never stopped
        ("356<eos>", 0.0, 2 / 3),  # units wrong
        ("457<eos>", 0.0, 2 / 3),
        ("57<eos>", 0.0, 2 / 3),  # aligned from the right: 5, 7 match
        ("3577<eos>", 0.0, 1 / 4),  # 7|7 match, 7|5 no, 5|3 no, 3|- no
        ("0357<eos>", 0.0, 3 / 4),  # leading zero is not exact
        (" 357<eos>", 0.0, 3 / 4),
        ("<eos>", 0.0, 0.0),
        ("", 0.0, -1.0),
        ("abc+=<eos>", 0.0, 0.0),
        ("<pad><pad>", 0.0, -1.0),
    ],
)
def test_gold_reward_cases(completion, exact, graded):
    assert gold_reward("12+345=", completion) == exact
    assert gold_reward("12+345=", completion, kind="graded") == pytest.approx(graded)


def test_gold_reward_options():
    assert gold_reward("12+345=", "357", require_eos=False) == 1.0
    assert gold_reward("12+345=", "356", kind="graded", require_eos=False) == pytest.approx(2 / 3)
    assert gold_reward("12+345=", "35", kind="graded", no_eos_score=-0.5) == -0.5
    assert gold_reward("12+345=", "357</s>", eos_token="</s>") == 1.0
    assert gold_reward("<bos><|user|>9+1=<|assistant|>", "10<eos>") == 1.0  # chat-rendered prompt


def test_gold_reward_bad_input():
    with pytest.raises(ValueError, match="kind"):
        gold_reward("1+1=", "2<eos>", kind="fuzzy")
    with pytest.raises(ValueError, match="no addition problem"):
        gold_reward("hello", "2<eos>")


def test_parse_problem():
    assert parse_problem("12+345=") == (12, 345)
    assert parse_problem("<|user|>1+2=<|assistant|>3+4=") == (3, 4)
    assert parse_problem("2+2+2=") == (2, 2, 2)


def test_gold_reward_counts_every_operand_and_prefers_the_answer():
    assert gold_reward("2+2+2=", "4<eos>") == 0.0
    assert gold_reward("2+2+2=", "6<eos>") == 1.0
    assert gold_reward("what is two plus two?", "4<eos>", answer="4") == 1.0
    assert gold_reward("1+1=", "2<eos>", answer="3") == 0.0  # the row's answer wins


def test_the_task_behind_the_interface_and_its_reward_function():
    from rlhf_jax.pipeline.tasks import load_task
    from rlhf_jax.tasks.arithmetic import correct

    task = load_task("arithmetic")
    assert task is load_task(None) and task.reward("1+2+3=", "6<eos>", eos_token="<eos>") == 1.0
    assert task.make_config({"max_digits": 2}).max_digits == 2
    assert correct(["1+2=", "5+5=", [{"role": "user", "content": "9+1="}]],
                   ["3", "11", [{"role": "assistant", "content": "10"}]]) == [1.0, 0.0, 1.0]
    assert correct(["hello"], ["7"], answer=["7"]) == [1.0]


@settings(max_examples=20, deadline=None)
@given(
    pairs=st.lists(
        st.tuples(st.integers(0, 999), st.integers(0, 999), st.integers(-2, 2)), min_size=1, max_size=8
    ),
    kind=st.sampled_from(["exact", "graded"]),
)
def test_gold_rewards_matches_the_single_scorer(pairs, kind):
    prompts = [f"{a}+{b}=" for a, b, _ in pairs]
    completions = [f"{a + b + delta}<eos>" for a, b, delta in pairs]
    batch = gold_rewards(prompts, completions, kind=kind)
    assert batch.dtype == np.float32 and batch.shape == (len(pairs),)
    expected = [gold_reward(p, c, kind=kind) for p, c in zip(prompts, completions)]
    np.testing.assert_allclose(batch, expected, rtol=1e-6)
    np.testing.assert_array_equal(batch == 1.0, [delta == 0 for _, _, delta in pairs])


def test_gold_rewards_length_mismatch():
    with pytest.raises(ValueError, match="length"):
        gold_rewards(["1+1="], [])


def test_task_config_from_overrides():
    config = load_config(TaskConfig, None, ["max_digits=2", "corruptions=[digit, drop]", "format=conversational"])
    assert (config.max_digits, config.corruptions, config.format) == (2, ("digit", "drop"), "conversational")
    with pytest.raises(ConfigError, match="noise"):
        load_config(TaskConfig, None, ["noise=0.1"])
