"""Token ids -> text -> the built-in task's gold reward, for RL rewards and evaluation.

The gold scorer (`rlhf_jax.pipeline.task.gold_reward`) reads text: the prompt decoded without
special tokens (`"12+345="`, also from a chat-rendered prompt) and the response decoded with
them, so the EOS token marks where the answer stops. Identical rows are decoded once (many
samples of one prompt repeat), which keeps scoring thousands of samples cheap.
"""
from __future__ import annotations

import numpy as np

from rlhf_jax.pipeline.task import gold_reward


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


def gold_score_fn(tokenizer, *, kind: str = "exact"):
    """A host scorer `(prompt_ids, response_ids, response_mask) -> [B]` for
    `rlhf_jax.training.rollout.host_scorer`."""

    def score(prompt_ids, response_ids, response_mask):
        del response_mask  # the EOS token in the decoded text marks the end
        return gold_scores(tokenizer, prompt_ids, response_ids, kind=kind)

    score.__name__ = f"gold_{kind}"
    return score


__all__ = ["decode_rows", "gold_scores", "gold_score_fn"]
