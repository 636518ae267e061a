"""The trainer arguments TRL's `GRPOTrainer` passes to reward functions besides the data.

TRL calls every reward function with `trainer_state`, `log_metric` and `log_extra` next to
`prompts`, `completions` and the dataset's columns. The PPO and GRPO stages pass:

- `trainer_state`: a `TrainerState` with TRL's `global_step` (optimizer steps done before this
  rollout) and `max_steps` (the run's optimizer steps, `optim.total_steps`), e.g. for a
  curriculum;
- `log_metric(name, value)`: a number logged as `name` in the iteration's metrics row (the
  mean of the values logged during the iteration's scoring), as TRL logs it.

`log_extra` (extra columns of TRL's completions table) is not passed: the stages keep no
completions table. `rlhf-jax eval` passes none of the three (it trains nothing). A function
that needs one that is not passed is refused when loaded; `name=None` as a default makes it
optional, as TRL's own examples write them.
"""
from __future__ import annotations

import dataclasses
import math

TRAINER_ARGUMENTS = ("trainer_state", "log_metric", "log_extra")
# metric families the stages write themselves; log_metric may not overwrite them
RESERVED_PREFIXES = ("objective/", "rollout/", "reward/", "grpo/", "ppo/", "value/", "optim/",
                     "dynamic_sampling/", "eval/")


@dataclasses.dataclass(frozen=True)
class TrainerState:
    """The fields of TRL's `TrainerState` that reward functions read."""

    global_step: int  # optimizer steps done before this rollout
    max_steps: int  # optimizer steps of the whole run


class MetricLog:
    """The values reward functions log during one scoring call (`logger(name)` is the
    `log_metric` given to function `name`); `means()` gives each metric's mean."""

    def __init__(self):
        self.values: dict[str, list[float]] = {}

    def logger(self, function_name: str):
        def log_metric(name, value) -> None:
            self._add(function_name, name, value)
        return log_metric

    def _add(self, function_name: str, name, value) -> None:
        from rlhf_jax.rewards.loading import RewardError
        where = f"reward function {function_name!r}: log_metric"
        if not isinstance(name, str) or not name:
            raise RewardError(f"{where} takes a metric name (a non-empty string), got {name!r}")
        if name.startswith(RESERVED_PREFIXES) or name == "step":
            raise RewardError(f"{where}({name!r}, ...) would overwrite a metric the stage logs (names under "
                              f"{', '.join(RESERVED_PREFIXES)} and 'step' are its own); choose another name")
        if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
            raise RewardError(f"{where}({name!r}, ...) takes a number, got {type(value).__name__}")
        value = float(value)
        if not math.isfinite(value):
            raise RewardError(f"{where}({name!r}, {value}) takes a finite number")
        self.values.setdefault(name, []).append(value)

    def means(self) -> dict[str, float]:
        return {name: sum(values) / len(values) for name, values in self.values.items()}


__all__ = ["MetricLog", "RESERVED_PREFIXES", "TRAINER_ARGUMENTS", "TrainerState"]
