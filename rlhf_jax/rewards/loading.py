"""Reward functions: what they are, how they are named in a config, how they are loaded.

A reward function follows the convention of TRL's `GRPOTrainer(reward_funcs=...)`:

    fn(prompts: list, completions: list, **columns) -> list[float | None]

`prompts` and `completions` are one entry per response (a prompt appears once per sample of
it): plain strings, or for conversational rows the prompt's message list and
`[{"role": "assistant", "content": text}]`. `columns` are the prompt dataset's other fields for
the same rows (e.g. `answer=[...]`) plus `completion_ids` (each response's token ids up to and
including its EOS). `None` means "does not apply to this row". A function whose signature has
no `**kwargs` receives only the columns it names. The PPO and GRPO stages also pass TRL's
trainer arguments `trainer_state` and `log_metric` (`rlhf_jax.rewards.trainer_arguments`).

In a config a function is `path/to/file.py:name` (relative to the working directory) or
`package.module:name`. `RewardError` carries the one-line message of anything that goes wrong
(import failure, exception, wrong length, non-number, NaN); the `rlhf-jax` command reports it
as `rlhf-jax <stage>: reward error: ...` with exit code 2.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Callable, Mapping

from rlhf_jax.rewards.trainer_arguments import TRAINER_ARGUMENTS


class RewardError(ValueError):
    """A reward function that cannot be loaded or returned something unusable (one line)."""


@dataclasses.dataclass(frozen=True)
class RewardFunction:
    """A reward function with its log name and its weight in the weighted sum."""

    name: str
    fn: Callable
    weight: float = 1.0

    def __post_init__(self):
        if not callable(self.fn):
            raise RewardError(f"reward function {self.name!r} is not callable (got {type(self.fn).__name__})")


def _load_file(path: Path, spec: str):
    if not path.is_file():
        raise RewardError(f"reward function {spec!r}: file {path} not found")
    module_name = f"rlhf_jax_user_rewards_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)  # let the file import its neighbours
    try:
        module_spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


def load_reward_function(spec: str) -> Callable:
    """The callable named by `spec`: `path/to/file.py:name` or `package.module:name`.

    Raises `RewardError` (one line) when the module cannot be imported, has no such name, or
    the object is not callable.
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise RewardError(f"reward function {spec!r}: expected 'path/to/file.py:name' or 'package.module:name'")
    where, name = spec.split(":")
    try:
        module = _load_file(Path(where), spec) if where.endswith(".py") else importlib.import_module(where)
    except RewardError:
        raise
    except BaseException as error:  # a user module may raise anything while importing
        raise RewardError(f"reward function {spec!r}: cannot import {where}: "
                          f"{type(error).__name__}: {_one_line(error)}") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise RewardError(f"reward function {spec!r}: {where} has no attribute {name!r}")
    if not callable(fn):
        raise RewardError(f"reward function {spec!r}: {name} is a {type(fn).__name__}, not a function")
    check_keyword_arguments(fn, spec)
    return fn


def check_keyword_arguments(fn: Callable, spec: str) -> None:
    """A RewardError when `fn` cannot take the keyword arguments every reward function gets,
    `prompts` and `completions` (as TRL passes them): a parameter of each name, or `**kwargs`
    (then also `completion_ids` and every data column). Callables whose signature cannot be
    read pass."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    named = {p.name for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                      inspect.Parameter.KEYWORD_ONLY)}
    missing = [name for name in ("prompts", "completions") if name not in named]
    if missing:
        raise RewardError(f"reward function {spec!r} takes no {', '.join(missing)} argument, which every reward "
                          f"function is given (with the data's columns) as a keyword: add `**kwargs` to its "
                          f"parameters, as TRL's reward functions have: def {function_name(fn, spec)}(completions, "
                          f"**kwargs)")


def function_name(fn: Callable, spec: str | None = None) -> str:
    """The name logged for a reward function: its `__name__`, else the spec's name part."""
    name = getattr(fn, "__name__", None)
    if not name or name == "<lambda>":
        name = spec.split(":")[-1] if spec else type(fn).__name__
    return name


def accepted_columns(fn: Callable, columns: dict) -> dict:
    """The keyword arguments `fn` can take: all `columns` if it has `**kwargs`, else the ones
    it names."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return dict(columns)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return dict(columns)
    names = {p.name for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                         inspect.Parameter.KEYWORD_ONLY)}
    return {key: value for key, value in columns.items() if key in names}


ALWAYS_PASSED = ("prompts", "completions", "completion_ids")  # given to every reward function


def _required_parameters(fn: Callable) -> list[str]:
    """The named parameters of `fn` without a default (not `*args` / `**kwargs`)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in parameters if p.kind in named and p.default is inspect.Parameter.empty]


def required_columns(fn: Callable) -> list[str]:
    """The parameters of `fn` that must come from the data's columns: those without a default,
    other than `prompts`, `completions` and `completion_ids` (and `*args` / `**kwargs`)."""
    return [name for name in _required_parameters(fn) if name not in ALWAYS_PASSED and name not in TRAINER_ARGUMENTS]


def required_trainer_arguments(fn: Callable) -> list[str]:
    """TRL's trainer arguments (`trainer_state`, `log_metric`, `log_extra`) that `fn` takes
    without a default."""
    return [name for name in _required_parameters(fn) if name in TRAINER_ARGUMENTS]


def check_trainer_arguments(functions: list[RewardFunction], passed: tuple[str, ...], who: str) -> None:
    """Raise `RewardError` naming the first function that needs one of TRL's trainer arguments
    that `who` (e.g. "rlhf-jax grpo") does not pass (`passed` are the ones it does)."""
    for function in functions:
        for name in required_trainer_arguments(function.fn):
            if name not in passed:
                why = ("it keeps no completions table" if name == "log_extra"
                       else "it trains nothing" if not passed else "")
                raise RewardError(
                    f"reward function {function.name!r} needs TRL's trainer argument {name!r}, which {who} "
                    f"does not pass{f' ({why})' if why else ''}; give it a default ({name}=None) to run "
                    f"without it (passed: {', '.join(passed) or 'none'})")


def check_columns(functions: list[RewardFunction], columns, where: str, row_names=None) -> None:
    """Raise `RewardError` naming the first function that needs a column `where` (the prompt
    data, e.g. its file names) does not have, before any response is sampled; `columns` are
    the names of the data's columns other than the prompt. When `columns` maps each name to
    its values (with `row_names`, one per row, e.g. "prompts.jsonl row 7"), a needed column
    that is missing (null) in some row is an error naming the first such row: the function
    would be called with None for it."""
    available = sorted(set(columns))
    for function in functions:
        needed = required_columns(function.fn)
        missing = [name for name in needed if name not in available]
        if missing:
            names = ", ".join(f"'{name}'" for name in missing)
            raise RewardError(
                f"reward function {function.name!r} needs the column{'s' if len(missing) > 1 else ''} {names}, "
                f"which {where} does not have (its columns besides 'prompt': {', '.join(available) or 'none'})")
        if not isinstance(columns, Mapping):
            continue
        for name in needed:
            row = next((row for row, value in enumerate(columns[name]) if value is None), None)
            if row is not None:
                place = row_names[row] if row_names is not None else f"row {row} of {where}"
                raise RewardError(f"reward function {function.name!r} needs the column '{name}', which is missing "
                                  f"(or null) in {place}; give every row a value, or drop the row")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] + ("..." if len(text) > 300 else "")


__all__ = ["RewardError", "RewardFunction", "load_reward_function", "function_name", "accepted_columns",
           "required_columns", "check_columns"]
