"""Reward functions: loading, calling with TRL's convention, checks, weighted sum, built-ins."""
import logging

import numpy as np
import pytest

from rlhf_jax.rewards import (RewardError, RewardFunction, RewardScorer, call_reward_functions, exact_match,
                              load_reward_function, overlong_penalty, overlong_penalty_value, reward_metrics,
                              math_answer, think_format, weighted_sum)
from rlhf_jax.rewards.loading import check_columns, required_columns
from rlhf_jax.pipeline.tokenizer import build_tokenizer, load_tokenizer


def dapo_overlong_oracle(length, max_length, cache):
    """DAPO (arXiv:2503.14476) eq. 13, written from the paper."""
    if length <= max_length - cache:
        return 0.0
    if max_length - cache < length <= max_length:
        return ((max_length - cache) - length) / cache
    return -1.0


@pytest.mark.parametrize("max_length, cache", [(20, 4), (16, 16), (9, 1)])
def test_overlong_penalty_matches_the_paper(max_length, cache):
    penalty = overlong_penalty(max_length, cache)
    lengths = list(range(0, max_length + 4))
    got = penalty(["x"] * len(lengths), completion_ids=[[7] * n for n in lengths])
    want = [dapo_overlong_oracle(n, max_length, cache) for n in lengths]
    np.testing.assert_allclose(got, want)
    assert got[max_length - cache] == 0.0 and got[max_length] == -1.0
    assert overlong_penalty_value(max_length + 1, max_length, cache) == -1.0


def test_overlong_penalty_rejects_bad_lengths():
    with pytest.raises(ValueError, match="cache_length"):
        overlong_penalty(4, 8)


def test_trl_style_function_with_kwargs_and_none_rows():
    def trl_style(completions, **kwargs):
        return [None if a is None else float(c == a) for c, a in zip(completions, kwargs["answer"])]

    def length_bonus(prompts, completions, completion_ids):  # no **kwargs: gets only what it names
        return [0.1 * len(ids) for ids in completion_ids]

    functions = [RewardFunction("trl_style", trl_style, 1.0), RewardFunction("length", length_bonus, 0.5)]
    values = call_reward_functions(functions, ["p"] * 3, ["4", "5", "6"],
                                   {"answer": ["4", None, "7"], "completion_ids": [[1], [1, 2], [1, 2, 3]]})
    np.testing.assert_allclose(values[:, 0], [1.0, np.nan, 0.0])
    np.testing.assert_allclose(weighted_sum(values, [1.0, 0.5]), [1.05, 0.1, 0.15], rtol=1e-6)
    metrics = reward_metrics(values, ["trl_style", "length"])
    assert metrics["reward/trl_style/mean"] == pytest.approx(0.5)
    assert metrics["reward/trl_style/std"] == pytest.approx(2 ** -0.5)  # sample std of [1, 0] (TRL's)
    assert reward_metrics(np.asarray([[3.0]], np.float32), ["one"])["reward/one/std"] == 0.0
    assert metrics["reward/length/mean"] == pytest.approx(0.2)


def test_trl_trainer_arguments():
    """`trainer_state` and `log_metric` go to functions that take them (by name or **kwargs);
    a function that needs one a caller does not pass is refused naming it; log_metric checks
    its name and value."""
    from rlhf_jax.rewards.loading import RewardError, check_trainer_arguments
    from rlhf_jax.rewards.trainer_arguments import MetricLog, TrainerState
    seen = {}

    def named(prompts, completions, trainer_state, log_metric):
        log_metric("mine/a", 1.0)
        log_metric("mine/a", np.float32(3.0))
        return [float(trainer_state.global_step)] * len(completions)

    def keywords(completions, **kwargs):
        seen.update(kwargs)
        return [0.0] * len(completions)

    def plain(prompts, completions):
        return [1.0] * len(completions)

    functions = [RewardFunction("named", named), RewardFunction("keywords", keywords), RewardFunction("plain", plain)]
    log = MetricLog()
    values = call_reward_functions(functions, ["p", "q"], ["x", "y"], trainer_state=TrainerState(7, 10), metric_log=log)
    assert values[:, 0].tolist() == [7.0, 7.0] and log.means() == {"mine/a": 2.0}
    assert seen["trainer_state"].max_steps == 10 and callable(seen["log_metric"])
    check_trainer_arguments(functions, ("trainer_state", "log_metric"), "rlhf-jax grpo")
    with pytest.raises(RewardError, match=r"'named' needs TRL's trainer argument 'trainer_state', which rlhf-jax "
                                          r"eval does not pass \(it trains nothing\); give it a default"):
        check_trainer_arguments(functions, (), "rlhf-jax eval")
    check_trainer_arguments([RewardFunction("optional", lambda completions, log_extra=None: [])], (), "rlhf-jax eval")
    for name, value, message in (("reward/x", 1.0, "would overwrite"), ("", 1.0, "non-empty string"),
                                 ("mine/b", "high", "takes a number"), ("mine/b", float("inf"), "finite")):
        with pytest.raises(RewardError, match=message):
            MetricLog().logger("f")(name, value)


def test_a_row_no_function_scores_gets_zero():
    values = call_reward_functions([RewardFunction("none", lambda prompts, completions: [None, 1.0])],
                                   ["a", "b"], ["x", "y"])
    assert weighted_sum(values, [2.0]).tolist() == [0.0, 2.0]
    assert reward_metrics(values, ["none"])["reward/unscored_fraction"] == 0.5


@pytest.mark.parametrize("body, message", [
    (lambda prompts, completions, **kw: 1 / 0, r"^reward function 'bad' raised ZeroDivisionError: division by zero \(at .*test_reward_functions.py line \d+\)$"),
    (lambda prompts, completions, **kw: [1.0], r"^reward function 'bad' returned 1 values for 3 completions"),
    (lambda prompts, completions, **kw: [1.0, "yes", 2.0], r"^reward function 'bad' returned a str .* for row 1 \(f.jsonl row 8\)"),
    (lambda prompts, completions, **kw: [1.0, 2.0, float("nan")], r"^reward function 'bad' returned nan for row 2 \(f.jsonl row 9\)"),
    (lambda prompts, completions, **kw: 3.0, r"^reward function 'bad' returned a float; expected a list"),
])
def test_bad_functions_give_one_line_errors(body, message):
    with pytest.raises(RewardError, match=message) as info:
        call_reward_functions([RewardFunction("bad", body)], ["a"] * 3, ["x"] * 3,
                              row_names=["f.jsonl row 7", "f.jsonl row 8", "f.jsonl row 9"])
    assert "\n" not in str(info.value)


def test_loading_from_a_file_and_a_module(tmp_path):
    (tmp_path / "helper_mod.py").write_text("SCALE = 2.0\n")
    (tmp_path / "rewards.py").write_text(
        "from helper_mod import SCALE\n"
        "def doubled(prompts, completions, **kw):\n    return [SCALE] * len(completions)\n")
    fn = load_reward_function(f"{tmp_path / 'rewards.py'}:doubled")
    assert fn(["a"], ["b"]) == [2.0]
    assert load_reward_function("rlhf_jax.rewards:think_format") is think_format


@pytest.mark.parametrize("spec, content, message", [
    ("missing.py:f", None, r"file missing.py not found"),
    ("broken.py:f", "import not_a_module_anywhere\n", r"cannot import broken.py: ModuleNotFoundError"),
    ("ok.py:g", "def f(prompts, completions): return []\n", r"ok.py has no attribute 'g'"),
    ("ok.py:X", "X = 3\n", r"X is a int, not a function"),
    ("no_colon", None, r"expected 'path/to/file.py:name'"),
    ("not_a_package_xyz.mod:f", None, r"cannot import not_a_package_xyz.mod"),
    # every function is called with prompts= and completions= (TRL's convention)
    ("nokw.py:f", "def f(completions): return []\n",
     r"^reward function 'nokw.py:f' takes no prompts argument, .*add `\*\*kwargs` .*def f\(completions, \*\*kwargs\)$"),
    ("nokw.py:f", "def f(answer, *args): return []\n", r"takes no prompts, completions argument"),
])
def test_loading_errors_are_one_line(tmp_path, monkeypatch, spec, content, message):
    """One line naming the spec; a function that takes both by name, or `**kwargs`, loads."""
    monkeypatch.chdir(tmp_path)
    if content is not None:
        (tmp_path / spec.split(":")[0]).write_text(content)
    with pytest.raises(RewardError, match=message) as info:
        load_reward_function(spec)
    assert "\n" not in str(info.value)


def test_exact_match_and_think_format():
    assert exact_match(["  The Answer. ", "\\boxed{Paris}", "<answer>rome</answer>", "x"],
                       ["answer", "paris", "Rome", None]) == [1.0, 1.0, 1.0, None]
    good = "<think>2+2 is 4</think>\n<answer>4</answer>"
    assert think_format([good, "4", "<answer>4</answer><think>x</think>"]) == [1.0, 0.0, 0.0]


def test_scorer_decodes_repeats_columns_and_wraps_conversations(tmp_path):
    build_tokenizer(tmp_path / "tok", "0123456789+=")
    tokenizer = load_tokenizer(tmp_path / "tok")
    eos = tokenizer.eos_token_id
    seen = {}

    def record(prompts, completions, answer, completion_ids, **kwargs):
        seen.update(prompts=prompts, completions=completions, answer=answer, ids=completion_ids)
        return [float(isinstance(c, str)) for c in completions]

    scorer = RewardScorer([RewardFunction("record", record, 2.0)], tokenizer)
    ids = np.array([tokenizer.convert_tokens_to_ids(list("12")) + [eos, 0],
                    tokenizer.convert_tokens_to_ids(list("3")) + [eos, 0, 0],
                    tokenizer.convert_tokens_to_ids(list("45")) + [eos, 0],
                    tokenizer.convert_tokens_to_ids(list("6789"))])
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    conversation = [{"role": "user", "content": "1+1="}]
    scores, metrics = scorer(ids, mask, ["5+7=", conversation], {"answer": ["12", "2"]}, repeat=2)
    assert seen["completions"][:2] == ["12", "3"]
    assert seen["completions"][2] == [{"role": "assistant", "content": "45"}]
    assert seen["answer"] == ["12", "12", "2", "2"] and seen["prompts"][2] is conversation
    assert seen["ids"][1] == ids[1, :2].tolist() and len(seen["ids"][3]) == 4
    assert scores.tolist() == [2.0, 2.0, 0.0, 0.0] and metrics["reward/record/mean"] == 0.5


def test_required_columns_are_the_parameters_without_defaults():
    def needs_answer(prompts, completions, answer, completion_ids, *, tests, level=1, **kwargs):
        return [0.0] * len(completions)

    assert required_columns(needs_answer) == ["answer", "tests"]
    assert required_columns(math_answer) == ["answer"]
    assert required_columns(think_format) == []
    assert required_columns(overlong_penalty(max_length=8, cache_length=2)) == []


def test_a_column_a_function_needs_is_checked_before_scoring():
    functions = [RewardFunction("fmt", think_format), RewardFunction("math", math_answer)]
    check_columns(functions, ["answer", "id"], "prompts.jsonl")
    with pytest.raises(RewardError) as error:
        check_columns(functions, ["id"], "prompts.jsonl")
    assert str(error.value) == ("reward function 'math' needs the column 'answer', which prompts.jsonl does not "
                                "have (its columns besides 'prompt': id)")


def test_a_needed_column_null_in_one_row_names_that_row():
    functions = [RewardFunction("fmt", think_format), RewardFunction("math", math_answer)]
    rows = ["prompts.jsonl row 1", "prompts.jsonl row 2", "prompts.jsonl row 3"]
    check_columns(functions, {"answer": ["1", "2", "3"], "id": [1, None, 3]}, "prompts.jsonl", rows)  # id: not needed
    with pytest.raises(RewardError) as error:
        check_columns(functions, {"answer": ["1", None, "3"]}, "prompts.jsonl", rows)
    assert str(error.value) == ("reward function 'math' needs the column 'answer', which is missing (or null) in "
                                "prompts.jsonl row 2; give every row a value, or drop the row")


def test_bool_rewards_count_as_zero_and_one():
    """As TRL's float conversion does: `[c == a for ...]` is a reward function."""
    values = call_reward_functions([RewardFunction("same", lambda prompts, completions, answer: [
        c == a for c, a in zip(completions, answer)])], ["p"] * 3, ["4", "5", "6"], {"answer": ["4", "x", "6"]})
    assert values[:, 0].tolist() == [1.0, 0.0, 1.0]
    values = call_reward_functions([RewardFunction("np", lambda prompts, completions: np.array([True, False]))],
                                   ["p"] * 2, ["a", "b"])
    assert values[:, 0].tolist() == [1.0, 0.0]


def test_a_batch_no_function_scores_warns_once(tmp_path):
    tokenizer = build_tokenizer(tmp_path / "tok", "abc")
    scorer = RewardScorer([RewardFunction("never", lambda prompts, completions: [None] * len(completions))], tokenizer)
    ids, mask = np.array([[5, 6], [6, 5]]), np.ones((2, 2), np.int32)
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("rlhf_jax.rewards.scorer")
    logger.addHandler(handler)
    try:
        scores, metrics = scorer(ids, mask, ["a", "b"])
        scorer(ids, mask, ["a", "b"])
    finally:
        logger.removeHandler(handler)
    assert scores.tolist() == [0.0, 0.0] and metrics["reward/unscored_fraction"] == 1.0
    warnings = [record.getMessage() for record in records]
    assert len(warnings) == 1 and warnings[0].startswith(
        "every reward function (never) returned None for all 2 completions of a batch")
