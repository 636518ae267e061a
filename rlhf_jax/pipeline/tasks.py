"""The task interface: what a built-in or user task gives the pipeline.

A task is a data generator, a scorer and reward functions, behind one small interface, so the
quick start (and `reward.kind: gold`, and evaluation) work with any task named in a config:

    task = load_task("name")                   # rlhf_jax.tasks.<name>:TASK
    task = load_task("my_package.my_task:TASK")
    files = task.build(output_dir, task.make_config({"seed": 3}))   # tokenizer + JSONL files
    task.reward(prompt, completion, answer, kind="exact", eos_token=tokenizer.eos_token)

- `build` writes a tokenizer folder and the data files of `TaskFiles` (SFT demonstrations,
  preference pairs, RL prompts, held-out prompts with an `answer` column, held-out pairs),
  deterministically from the task config.
- `reward` is the verifiable score of one completion (decoded WITH special tokens, so the EOS
  token marks where it stopped): `kind="exact"` 1.0 or 0.0 (pass@k counts it), `"graded"` with
  partial credit (win rates compare it). `answer` is the prompt row's reference when it has
  one.
- `reward_functions` are the task's TRL-style reward functions (`rlhf_jax.rewards`), for
  `reward.functions` in a GRPO / PPO / eval config.

Names without a colon are modules of the `rlhf_jax.tasks` package; the pipeline never imports
a task module by itself.
"""
from __future__ import annotations

import abc
import dataclasses
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from rlhf_jax.typed_config import ConfigError, from_dict

TASK_PACKAGE = "rlhf_jax.tasks"


@dataclass(frozen=True)
class TaskFiles:
    """Paths a task's `build` writes."""

    tokenizer_dir: Path
    sft: Path
    preferences: Path
    prompts: Path
    eval_prompts: Path
    eval_preferences: Path
    config: Path


class Task(abc.ABC):
    """A task: data generator (`build`), scorer (`reward`), reward functions (module docstring)."""

    name: str = ""
    config_class: type = object  # the dataclass of its `task:` config section

    def make_config(self, options: dict | None = None):
        """The task config from a `task:` mapping (unknown keys are a ConfigError)."""
        return from_dict(self.config_class, dict(options or {}), prefix="task")

    @abc.abstractmethod
    def build(self, output_dir: str | Path, config) -> TaskFiles:
        """Write the tokenizer and data files into `output_dir`."""

    @abc.abstractmethod
    def reward(self, prompt: str, completion: str, answer: str | None = None, *, kind: str = "exact",
               eos_token: str) -> float:
        """The verifiable reward of `completion` for `prompt`: the completion's text before its
        EOS without special tokens, then `eos_token` when it stopped (absent when it did not)."""

    def reward_functions(self) -> dict[str, Callable]:
        """TRL-style reward functions of the task, by name."""
        return {}

    def describe(self, config) -> str:
        """One sentence about the generated data, for reports."""
        return f"Task {self.name}."


def default_task_name() -> str:
    """The task the quick start and the gold scorer use when none is named."""
    return importlib.import_module(TASK_PACKAGE).DEFAULT_TASK


def load_task(name: str | None = None) -> Task:
    """The task `name` (a module of `rlhf_jax.tasks`, or `package.module:ATTRIBUTE`); raises
    ConfigError naming it when it cannot be loaded."""
    name = name or default_task_name()
    module_name, _, attribute = name.partition(":") if ":" in name else (f"{TASK_PACKAGE}.{name}", "", "TASK")
    try:
        task = getattr(importlib.import_module(module_name), attribute or "TASK")
    except (ImportError, AttributeError) as error:
        known = ", ".join(importlib.import_module(TASK_PACKAGE).BUILT_IN_TASKS)
        raise ConfigError(f"unknown task {name!r} ({error}); built-in tasks: {known}, "
                          "or name one as 'package.module:TASK'") from None
    if not isinstance(task, Task):
        raise ConfigError(f"task {name!r} is a {type(task).__name__}, not a rlhf_jax Task")
    return task


def split_task_section(section: dict[str, Any]) -> tuple[Task, Any]:
    """`(task, config)` of a quick-start `task:` mapping: `name` (default: the default task)
    plus the task config's own keys."""
    options = dict(section or {})
    task = load_task(options.pop("name", None))
    return task, task.make_config(options)


def write_jsonl(path: str | Path, rows: Sequence[dict]) -> None:
    """Write one JSON object per line (UTF-8, keys in insertion order)."""
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_config(path: str | Path, config) -> Path:
    """The task config as JSON (`task_config.json`)."""
    path = Path(path)
    path.write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    return path


__all__ = ["TASK_PACKAGE", "TaskFiles", "Task", "default_task_name", "load_task", "split_task_section",
           "write_jsonl", "write_config"]
