"""Reward functions (TRL-compatible) and the built-in ones.

    fn(prompts, completions, **columns) -> list[float | None]

See `rlhf_jax.rewards.loading` for the calling convention and `rlhf_jax.rewards.combine` for
how several are combined. Built-ins: `math_answer` (math-verify), `exact_match`,
`think_format` / `regex_format(pattern)`, `overlong_penalty(max_length, cache_length)` (DAPO).
`RewardScorer` turns reward functions into host scores for `grpo_train` / `ppo_train`.
"""
from rlhf_jax.rewards.combine import call_reward_functions, reward_metrics, unique_names, weighted_sum
from rlhf_jax.rewards.loading import RewardError, RewardFunction, function_name, load_reward_function
from rlhf_jax.rewards.math_answer import answers_agree, extract_answer, math_answer
from rlhf_jax.rewards.overlong import overlong_penalty, overlong_penalty_value
from rlhf_jax.rewards.scorer import RewardScorer
from rlhf_jax.rewards.text import exact_match, normalize_answer, regex_format, think_format

__all__ = [
    "RewardError", "RewardFunction", "load_reward_function", "function_name", "call_reward_functions",
    "weighted_sum", "reward_metrics", "unique_names", "math_answer", "answers_agree", "extract_answer",
    "exact_match", "normalize_answer", "regex_format", "think_format", "overlong_penalty",
    "overlong_penalty_value", "RewardScorer",
]
