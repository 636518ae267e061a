"""Reward functions -> host scores of sampled responses (token ids in, float32 scores out).

Use it between the two jitted phases of a GRPO or PPO iteration:

    from rlhf_jax.rewards import RewardFunction, RewardScorer, math_answer, think_format
    from rlhf_jax.training.grpo import grpo_generate, grpo_train

    scorer = RewardScorer([RewardFunction("correct", math_answer, 1.0),
                           RewardFunction("format", think_format, 0.1)], tokenizer)
    generate = jax.jit(grpo_generate, static_argnames=("config",))
    train = jax.jit(grpo_train, static_argnames=("config",), donate_argnames=("policy_state",))
    for batch in batches:                                     # prompt ids + the rows' columns
        key, sample_key, shuffle_key = jax.random.split(key, 3)
        data = generate(state, ref_params, batch.prompt_ids, batch.prompt_mask, sample_key, config=config)
        _, response_ids, response_mask = data.flat_responses()  # [n * G, R]
        scores, metrics = scorer(response_ids, response_mask, batch.prompts,
                                 {"answer": batch.answers}, repeat=config.group_size)
        state, train_metrics = train(state, data, scores, shuffle_key, config=config)

`prompts` and `columns` hold one entry per prompt; with `repeat=G` each is repeated for the G
contiguous responses of its prompt (the `grpo_generate` layout).
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from rlhf_jax.rewards.combine import call_reward_functions, reward_metrics, unique_names, weighted_sum
from rlhf_jax.rewards.loading import RewardFunction

logger = logging.getLogger(__name__)


class RewardScorer:
    """Scores responses with weighted reward functions (see the module docstring)."""

    def __init__(self, functions: Sequence[RewardFunction], tokenizer):
        if not functions:
            raise ValueError("RewardScorer needs at least one reward function")
        self.functions = unique_names(functions)
        self.tokenizer = tokenizer
        self._warned_unscored = False

    @property
    def names(self) -> list[str]:
        return [function.name for function in self.functions]

    def completions(self, response_ids, response_mask, prompts: Sequence) -> tuple[list, list[list[int]]]:
        """`(completions, completion_ids)`: each response's counted tokens (EOS included) and
        their text decoded without special tokens, wrapped as an assistant message where the
        prompt is a message list (TRL's convention)."""
        response_ids, response_mask = np.asarray(response_ids), np.asarray(response_mask)
        completion_ids = [row[mask != 0].tolist() for row, mask in zip(response_ids, response_mask)]
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        completions = [[{"role": "assistant", "content": text}] if isinstance(prompt, (list, tuple)) else text
                       for text, prompt in zip(texts, prompts)]
        return completions, completion_ids

    def values(self, response_ids, response_mask, prompts: Sequence, columns: dict | None = None, *,
               repeat: int = 1, row_names: Sequence[str] | None = None, **trainer) -> np.ndarray:
        """`[B, F]` rewards of each function (NaN where it returned None); `trainer`: TRL's
        `trainer_state` and `metric_log` (`call_reward_functions`)."""
        prompts = [prompt for prompt in prompts for _ in range(repeat)]
        columns = {name: [value for value in values for _ in range(repeat)]
                   for name, values in (columns or {}).items()}
        if row_names is not None:
            row_names = [name for name in row_names for _ in range(repeat)]
        completions, completion_ids = self.completions(response_ids, response_mask, prompts)
        return call_reward_functions(self.functions, prompts, completions,
                                     {**columns, "completion_ids": completion_ids}, row_names=row_names, **trainer)

    def __call__(self, response_ids, response_mask, prompts: Sequence, columns: dict | None = None, *,
                 repeat: int = 1, row_names: Sequence[str] | None = None, **trainer) -> tuple[np.ndarray, dict]:
        """`(scores [B] float32, metrics)`: the weighted sum and `reward/<name>/mean|std`. The
        first batch in which every function returns None for every row logs a warning: all
        its scores are 0, so an update learns nothing from it."""
        values = self.values(response_ids, response_mask, prompts, columns, repeat=repeat, row_names=row_names,
                             **trainer)
        if values.size and np.isnan(values).all() and not self._warned_unscored:
            self._warned_unscored = True
            logger.warning("every reward function (%s) returned None for all %d completions of a batch: "
                           "their scores are 0 and the update learns nothing from them (None means 'does not "
                           "apply'); check that the functions apply to these prompts (reward/unscored_fraction "
                           "in the metrics)", ", ".join(self.names), values.shape[0])
        return (weighted_sum(values, [function.weight for function in self.functions]),
                reward_metrics(values, self.names))


__all__ = ["RewardScorer"]
