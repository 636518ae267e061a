"""What scores an RL stage's responses, on the host: reward functions, the gold scorer, and
the reward model's in-jit score added to them.

Reward functions (`reward.functions`, see `rlhf_jax.rewards`) and the built-in task's gold
scorer read decoded text, so they run on the host between the jitted generate phase
(`grpo_generate` / `ppo_generate`) and the update phase (`grpo_train` / `ppo_train`), never
inside a JAX callback: an error in a reward function is a `RewardError`, reported by the CLI in
one line (`reward error`) with exit code 2.

The gold scorer (`rlhf_jax.pipeline.task.gold_reward`) reads the prompt decoded without special
tokens (`"12+345="`, also from a chat-rendered prompt) and the response decoded with them, so
the EOS token marks where the answer stops. Identical rows are decoded once.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from rlhf_jax.pipeline.task import gold_reward
from rlhf_jax.rewards import RewardFunction, RewardScorer, function_name, load_reward_function

# Columns of prompt data that are not passed to reward functions as keyword arguments.
NOT_PASSED = ("prompt", "prompt_text")


def decode_rows(tokenizer, ids: np.ndarray, *, skip_special_tokens: bool) -> list[str]:
    """Decode each row of `ids` [B, T]; identical rows are decoded once."""
    ids = np.asarray(ids)
    unique, inverse = np.unique(ids, axis=0, return_inverse=True)
    texts = tokenizer.batch_decode(unique.tolist(), skip_special_tokens=skip_special_tokens)
    return [texts[i] for i in np.ravel(inverse)]


def gold_scores(tokenizer, prompt_ids, response_ids, *, kind: str = "exact") -> np.ndarray:
    """Gold rewards [B] float32 of responses [B, N] to prompts [B, P] (token ids).

    A response without the tokenizer's EOS token did not stop and scores 0 ("exact") or -1
    ("graded"), see `gold_reward`.
    """
    prompts = decode_rows(tokenizer, prompt_ids, skip_special_tokens=True)
    responses = decode_rows(tokenizer, response_ids, skip_special_tokens=False)
    cache: dict[tuple[str, str], float] = {}
    scores = np.empty(len(prompts), np.float32)
    for index, pair in enumerate(zip(prompts, responses)):
        if pair not in cache:
            cache[pair] = gold_reward(pair[0], pair[1], kind=kind, eos_token=tokenizer.eos_token)
        scores[index] = cache[pair]
    return scores


def reward_functions(specs) -> list[RewardFunction]:
    """Load `reward.functions` entries (`RewardFunctionSpec`s); raises `RewardError`."""
    functions = []
    for spec in specs:
        fn = load_reward_function(spec.function)
        functions.append(RewardFunction(function_name(fn, spec.function), fn, float(spec.weight)))
    return functions


@dataclasses.dataclass
class HostScorer:
    """Scores a stage's rollouts on the host from its `reward` section.

    `scores(...)` returns `[B]` float32 scores: the weighted reward functions (plus
    `model_weight *` the reward model's in-jit score, passed as `model_scores`), or the gold
    scorer; and the metrics `reward/<name>/mean|std`.
    """

    tokenizer: Any
    functions: RewardScorer | None
    gold_kind: str | None
    model_weight: float | None  # None: no reward model
    prompts: list  # the prompt data's `prompt` column (strings or message lists)
    columns: dict[str, list]  # the other columns, passed to reward functions
    row_names: list[str]  # "file row n" of each data row

    @classmethod
    def from_config(cls, reward, tokenizer, data) -> "HostScorer":
        functions = reward_functions(reward.functions)
        prompts = data.columns.get("prompt") or data.columns["prompt_text"]
        return cls(
            tokenizer=tokenizer,
            functions=RewardScorer(functions, tokenizer) if functions else None,
            gold_kind=reward.gold_kind if reward.uses_gold else None,
            model_weight=float(reward.model_weight) if reward.uses_model and functions else None,
            prompts=list(prompts),
            columns={name: values for name, values in data.columns.items() if name not in NOT_PASSED},
            row_names=[f"{file} row {number}" for file, number in data.sources],
        )

    def describe(self) -> list[str]:
        """One line per scoring part, with its weight."""
        lines = []
        if self.functions is not None:
            lines += [f"{f.name} (weight {f.weight:g})" for f in self.functions.functions]
        if self.model_weight is not None:
            lines.append(f"reward model (weight {self.model_weight:g})")
        if self.gold_kind is not None:
            lines.append(f"gold scorer ({self.gold_kind})")
        return lines

    def scores(self, prompt_ids, response_ids, response_mask, rows: np.ndarray, *, repeat: int = 1,
               model_scores=None) -> tuple[np.ndarray, dict]:
        """Scores of responses `[B, N]` to the data rows `rows` `[B / repeat]` (each row's
        `repeat` responses contiguous)."""
        response_ids, response_mask = np.asarray(response_ids), np.asarray(response_mask)
        if self.gold_kind is not None:
            return gold_scores(self.tokenizer, np.asarray(prompt_ids), response_ids, kind=self.gold_kind), {}
        rows = np.asarray(rows)
        scores, metrics = self.functions(
            response_ids, response_mask, [self.prompts[row] for row in rows],
            {name: [values[row] for row in rows] for name, values in self.columns.items()},
            repeat=repeat, row_names=[self.row_names[row] for row in rows])
        if self.model_weight is not None:
            model_scores = np.asarray(model_scores, np.float32)
            metrics["reward/reward_model/mean"] = float(model_scores.mean())
            metrics["reward/reward_model/std"] = float(model_scores.std())
            scores = scores + np.float32(self.model_weight) * model_scores
        return scores.astype(np.float32), metrics


__all__ = ["decode_rows", "gold_scores", "reward_functions", "HostScorer", "NOT_PASSED"]
