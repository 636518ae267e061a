"""What scores an RL stage's responses, on the host: reward functions, the gold scorer, and
the reward model's in-jit score added to them.

Reward functions (`reward.functions`, see `rlhf_jax.rewards`) and the built-in task's gold
scorer read decoded text, so they run on the host between the jitted generate phase
(`grpo_generate` / `ppo_generate`) and the update phase (`grpo_train` / `ppo_train`), never
inside a JAX callback: an error in a reward function is a `RewardError`, reported by the CLI in
one line (`reward error`) with exit code 2.

The gold scorer (`reward.kind: gold`, or `auto` without `reward.path`) is the `reward` of a
task (`rlhf_jax.pipeline.tasks`): it reads the prompt decoded without special tokens (also
from a chat-rendered prompt), the response decoded with them, so the EOS token marks where the
answer stops, and the row's `answer` when the data has one. Identical rows are decoded once.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from rlhf_jax.pipeline.tasks import load_task
from rlhf_jax.rewards import RewardError, RewardFunction, RewardScorer, function_name, load_reward_function
from rlhf_jax.rewards.loading import check_columns, check_trainer_arguments
from rlhf_jax.rewards.trainer_arguments import MetricLog, TrainerState
from rlhf_jax.training import multihost

# Columns of prompt data that are not passed to reward functions as keyword arguments.
NOT_PASSED = ("prompt", "prompt_text")


def decode_rows(tokenizer, ids: np.ndarray, *, skip_special_tokens: bool) -> list[str]:
    """Decode each row of `ids` [B, T]; identical rows are decoded once."""
    ids = np.asarray(ids)
    unique, inverse = np.unique(ids, axis=0, return_inverse=True)
    texts = tokenizer.batch_decode(unique.tolist(), skip_special_tokens=skip_special_tokens)
    return [texts[i] for i in np.ravel(inverse)]


def decode_until_eos(tokenizer, response_ids: np.ndarray, eos_token_id) -> tuple[list[str], np.ndarray]:
    """`(texts, ended)` of responses [B, N]: each row's tokens before its first stop id
    (`eos_token_id`: one id or a tuple of them) decoded without special tokens (so a chat
    template's end-of-turn token, say, is not part of the answer; identical rows decoded
    once), and `[B]` bool, whether the row has a stop id."""
    rows = np.asarray(response_ids)
    hits = np.isin(rows, np.asarray(eos_token_id).reshape(-1))
    ended = np.any(hits, axis=1)
    cut = [tuple(row[: np.argmax(hit)] if stop else row) for row, hit, stop in zip(rows, hits, ended)]
    unique = list(dict.fromkeys(cut))
    texts = dict(zip(unique, tokenizer.batch_decode([list(ids) for ids in unique], skip_special_tokens=True)))
    return [texts[ids] for ids in cut], ended


def decode_responses(tokenizer, response_ids: np.ndarray, eos_token_id, eos_token: str) -> list[str]:
    """Each response [B, N] as its scorer reads it: `decode_until_eos`'s text, then
    `eos_token` when the response has a stop id (it stopped)."""
    texts, ended = decode_until_eos(tokenizer, response_ids, eos_token_id)
    return [text + (eos_token if stop else "") for text, stop in zip(texts, ended)]


def gold_scores(tokenizer, prompt_ids, response_ids, *, kind: str = "exact", task: str | None = None,
                answers=None, eos_token_id: int | tuple[int, ...] | None = None) -> np.ndarray:
    """Gold rewards [B] float32 of responses [B, N] to prompts [B, P] (token ids), by the
    scorer of `task` (`rlhf_jax.pipeline.tasks`; None: the default task), with the rows'
    reference `answers` [B] when the prompt data has them.

    A response without the EOS token (the tokenizer's, or any of the sampling's stop ids
    `eos_token_id` when given) did not stop (the task's scorer decides what that scores). The
    scorer reads the text before the stop id without special tokens, then the EOS text of the
    first stop id (`decode_responses`). A prompt the scorer cannot read is a `RewardError`
    naming it.
    """
    scorer = load_task(task)
    prompts = decode_rows(tokenizer, prompt_ids, skip_special_tokens=True)
    eos_token_id = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    first = eos_token_id[0] if isinstance(eos_token_id, tuple) else eos_token_id
    eos_token = tokenizer.decode([first])
    responses = decode_responses(tokenizer, response_ids, eos_token_id, eos_token)
    answers = [None] * len(prompts) if answers is None else [None if a is None else str(a) for a in answers]
    cache: dict[tuple, float] = {}
    scores = np.empty(len(prompts), np.float32)
    for index, key in enumerate(zip(prompts, responses, answers)):
        if key not in cache:
            try:
                cache[key] = scorer.reward(*key, kind=kind, eos_token=eos_token)
            except ValueError as error:
                raise RewardError(f"the {scorer.name} task's gold scorer cannot score prompt {key[0]!r}: "
                                  f"{error}") from None
        scores[index] = cache[key]
    return scores


def check_gold_prompts(task: str | None, prompt_texts, answers, row_names) -> None:
    """A RewardError naming the first prompt row (as the model sees it; with its `answer`,
    when the data has one) that the gold scorer of `task` cannot score, before any sampling:
    the gold scorer (the default without `reward.path`) on prompts of another task."""
    scorer = load_task(task)
    answers = [None] * len(prompt_texts) if answers is None else answers
    for text, answer, row in zip(prompt_texts, answers, row_names):
        try:
            scorer.reward(text, "", None if answer is None else str(answer), kind="exact", eos_token="\x00")
        except ValueError as error:
            raise RewardError(
                f"the {scorer.name} task's gold scorer (the default without `reward.path`) cannot score {row}: "
                f"{error}; score these prompts with `reward.functions` (your own reward functions) or "
                f"`reward.path` (a reward model), or give each row the `answer` to compare with") from None


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
    scorer; and the metrics `reward/<name>/mean|std`. Reward functions also get TRL's
    `trainer_state` (with `global_step`, the `step` given to `score_rollout`, and `max_steps`)
    and `log_metric` (its values join the metrics; `rlhf_jax.rewards.trainer_arguments`).
    """

    tokenizer: Any
    functions: RewardScorer | None
    gold_kind: str | None
    gold_task: str | None  # the task whose scorer is `gold`
    model_weight: float | None  # None: no reward model
    prompts: list  # the prompt data's `prompt` column (strings or message lists)
    columns: dict[str, list]  # the other columns, passed to reward functions
    row_names: list[str]  # "file row n" of each data row
    eos_token_id: int | tuple[int, ...] | None = None  # the ids responses stop at (None: the tokenizer's EOS)
    max_steps: int = 0  # the run's optimizer steps (trainer_state.max_steps)

    @classmethod
    def from_config(cls, reward, tokenizer, data, eos_token_id: int | tuple[int, ...] | None = None, *,
                    stage: str = "grpo", max_steps: int = 0) -> "HostScorer":
        functions = reward_functions(reward.functions)
        columns = {name: values for name, values in data.columns.items() if name not in NOT_PASSED}
        row_names = [f"{file} row {number}" for file, number in data.sources]
        check_trainer_arguments(functions, ("trainer_state", "log_metric"), f"rlhf-jax {stage}")
        check_columns(functions, columns, data.files, row_names)
        if reward.uses_gold:
            check_gold_prompts(reward.task, data.columns["prompt_text"], columns.get("answer"), row_names)
        prompts = data.columns.get("prompt") or data.columns["prompt_text"]
        return cls(
            tokenizer=tokenizer,
            functions=RewardScorer(functions, tokenizer) if functions else None,
            gold_kind=reward.gold_kind if reward.uses_gold else None,
            gold_task=reward.task,
            model_weight=float(reward.model_weight) if reward.uses_model and functions else None,
            prompts=list(prompts),
            columns=columns,
            row_names=row_names,
            eos_token_id=eos_token_id,
            max_steps=int(max_steps),
        )

    def describe(self) -> list[str]:
        """One line per scoring part, with its weight."""
        lines = []
        if self.functions is not None:
            lines += [f"{f.name} (weight {f.weight:g})" for f in self.functions.functions]
        if self.model_weight is not None:
            lines.append(f"reward model (weight {self.model_weight:g})")
        if self.gold_kind is not None:
            against = " against the `answer` column" if "answer" in self.columns else ""
            lines.append(f"gold scorer of the {load_task(self.gold_task).name} task{against} ({self.gold_kind})")
        return lines

    def score_rollout(self, data, rows, *, repeat: int = 1, step=None) -> tuple[np.ndarray, dict]:
        """`scores` of a rollout `data` (device arrays, possibly sharded over several
        processes) to the data rows `rows` (a device array placed like the prompts). Every
        process gathers the rollout and scores it; process 0's scores and metrics are the
        ones every process returns, so reward functions need not be deterministic (they run
        on every process). `step` (the policy state's optimizer step, a device scalar, fetched
        with the rollout) is `trainer_state.global_step`."""
        prompt_ids, response_ids, response_mask, rows, model_scores, step = multihost.fetch(
            (*data.flat_responses(), rows, data.scores, step))
        model_scores = None if model_scores is None else np.asarray(model_scores).reshape(-1)
        return multihost.from_main_process(self.scores(prompt_ids, response_ids, response_mask, rows,
                                                       repeat=repeat, model_scores=model_scores,
                                                       step=None if step is None else int(step)))

    def scores(self, prompt_ids, response_ids, response_mask, rows: np.ndarray, *, repeat: int = 1,
               model_scores=None, step: int | None = None) -> tuple[np.ndarray, dict]:
        """Scores of responses `[B, N]` to the data rows `rows` `[B / repeat]` (each row's
        `repeat` responses contiguous); `step` is `trainer_state.global_step` (None: 0)."""
        response_ids, response_mask = np.asarray(response_ids), np.asarray(response_mask)
        rows = np.asarray(rows)
        if self.gold_kind is not None:
            answers = self.columns.get("answer")
            answers = None if answers is None else [answers[row] for row in rows for _ in range(repeat)]
            return gold_scores(self.tokenizer, np.asarray(prompt_ids), response_ids, kind=self.gold_kind,
                               task=self.gold_task, answers=answers, eos_token_id=self.eos_token_id), {}
        logged = MetricLog()
        scores, metrics = self.functions(
            response_ids, response_mask, [self.prompts[row] for row in rows],
            {name: [values[row] for row in rows] for name, values in self.columns.items()},
            repeat=repeat, row_names=[self.row_names[row] for row in rows],
            trainer_state=TrainerState(global_step=step or 0, max_steps=self.max_steps), metric_log=logged)
        metrics.update(logged.means())
        if self.model_weight is not None:
            model_scores = np.asarray(model_scores, np.float32)
            metrics["reward/reward_model/mean"] = float(model_scores.mean())
            metrics["reward/reward_model/std"] = float(model_scores.std(ddof=1)) if model_scores.size > 1 else 0.0
            scores = scores + np.float32(self.model_weight) * model_scores
        return scores.astype(np.float32), metrics


__all__ = ["decode_rows", "decode_until_eos", "decode_responses", "gold_scores", "check_gold_prompts", "reward_functions", "HostScorer", "NOT_PASSED"]
