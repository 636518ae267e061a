"""Calling reward functions on a batch, checking what they return, and the weighted sum.

    values = call_reward_functions(functions, prompts, completions, columns)   # [B, F], NaN = None
    scores = weighted_sum(values, [f.weight for f in functions])                # [B]
    metrics = reward_metrics(values, [f.name for f in functions])

The combination follows TRL's GRPOTrainer: a `None` is left out of that row's weighted sum
(`nansum` over the functions), so a row every function skips scores 0. Each function's mean and
standard deviation over the rows it scored are logged as `reward/<name>/mean`,
`reward/<name>/std`.
"""
from __future__ import annotations

import numbers
import traceback
from typing import Sequence

import numpy as np

from rlhf_jax.rewards.loading import RewardError, RewardFunction, _one_line, accepted_columns
from rlhf_jax.rewards.trainer_arguments import MetricLog, TrainerState


def _check_value(value, name: str, row: int, describe) -> float:
    """A function's value as float: None -> NaN, a bool -> 0 / 1 (as TRL's float conversion)."""
    if value is None:
        return np.nan
    if not isinstance(value, (numbers.Real, np.number, np.bool_)):
        raise RewardError(f"reward function {name!r} returned a {type(value).__name__} ({value!r:.40}) "
                          f"for {describe(row)}; expected a number or None")
    value = float(value)
    if not np.isfinite(value):
        raise RewardError(f"reward function {name!r} returned {value} for {describe(row)}; "
                          "expected a finite number or None")
    return value


def _where(error: BaseException) -> str:
    """` (at <file> line <n>)`: where `error` was raised (the innermost frame)."""
    frames = traceback.extract_tb(error.__traceback__)
    return f" (at {frames[-1].filename} line {frames[-1].lineno})" if frames else ""


def call_reward_functions(functions: Sequence[RewardFunction], prompts: list, completions: list,
                          columns: dict | None = None, *, row_names: Sequence[str] | None = None,
                          trainer_state: TrainerState | None = None, metric_log: MetricLog | None = None
                          ) -> np.ndarray:
    """`[B, F]` float32: function f's reward for row b, NaN where it returned None.

    `columns` (lists of length B) are passed as keyword arguments (see `accepted_columns`), and
    so are TRL's trainer arguments `trainer_state` and `log_metric` (into `metric_log`) when given.
    `row_names[b]` describes row b in errors (e.g. `"prompts.jsonl row 12"`). Raises
    `RewardError` naming the function (and the first offending row) when a function raises,
    returns a length other than B, a non-number, or a NaN / infinite value.
    """
    batch = len(prompts)
    if len(completions) != batch:
        raise ValueError(f"{batch} prompts but {len(completions)} completions")
    columns = dict(columns or {})

    def describe(row: int) -> str:
        return f"row {row}" + (f" ({row_names[row]})" if row_names is not None else "")

    values = np.empty((batch, len(functions)), np.float32)
    for index, function in enumerate(functions):
        try:
            trainer = {} if trainer_state is None else {"trainer_state": trainer_state}
            if metric_log is not None:
                trainer["log_metric"] = metric_log.logger(function.name)
            out = function.fn(prompts=prompts, completions=completions,
                              **accepted_columns(function.fn, {**columns, **trainer}))
        except RewardError:
            raise
        except Exception as error:
            raise RewardError(f"reward function {function.name!r} raised {type(error).__name__}: "
                              f"{_one_line(error)}{_where(error)}") from None
        if isinstance(out, np.ndarray):
            out = out.tolist()
        if not isinstance(out, (list, tuple)):
            raise RewardError(f"reward function {function.name!r} returned a {type(out).__name__}; "
                              f"expected a list of {batch} numbers (one per completion)")
        if len(out) != batch:
            raise RewardError(f"reward function {function.name!r} returned {len(out)} values for "
                              f"{batch} completions; expected one per completion")
        values[:, index] = [_check_value(value, function.name, row, describe) for row, value in enumerate(out)]
    return values


def weighted_sum(values: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """`[B]` float32: `sum_f w_f * values[:, f]` over the functions that scored the row."""
    weights = np.asarray(weights, np.float32)
    return np.nansum(values * weights[None, :], axis=1).astype(np.float32)


def reward_metrics(values: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """`reward/<name>/mean`, `reward/<name>/std` over the rows each function scored (a function
    that scored no row is left out; the std is the sample std, ddof 1, as TRL's
    `rewards/<name>/std`, 0 for one row), and `reward/unscored_fraction`: rows no function scored."""
    metrics = {}
    for index, name in enumerate(names):
        column = values[:, index]
        column = column[~np.isnan(column)]
        if column.size:
            metrics[f"reward/{name}/mean"] = float(column.mean())
            metrics[f"reward/{name}/std"] = float(column.std(ddof=1)) if column.size > 1 else 0.0
    if values.shape[1]:
        metrics["reward/unscored_fraction"] = float(np.mean(np.all(np.isnan(values), axis=1)))
    return metrics


def unique_names(functions: Sequence[RewardFunction]) -> list[RewardFunction]:
    """The functions with distinct log names (a repeated name gets `_2`, `_3`, ...)."""
    seen: dict[str, int] = {}
    renamed = []
    for function in functions:
        count = seen.get(function.name, 0) + 1
        seen[function.name] = count
        name = function.name if count == 1 else f"{function.name}_{count}"
        renamed.append(RewardFunction(name, function.fn, function.weight))
    return renamed


__all__ = ["call_reward_functions", "weighted_sum", "reward_metrics", "unique_names"]
