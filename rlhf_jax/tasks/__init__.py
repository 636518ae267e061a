"""Built-in tasks behind the `rlhf_jax.pipeline.tasks.Task` interface (data generator, scorer,
reward functions). Name one in a config as `task: {name: countdown, ...}` (quick start) or
`reward.task` / `task` (gold scorer, evaluation).

    arithmetic  multi-digit addition "12+345=" -> "357" (the quick start's default)
    countdown   reach a target from given numbers with + - * / ("3 5 7 -> 22": "3*5+7")
"""
BUILT_IN_TASKS = ("arithmetic", "countdown")
DEFAULT_TASK = "arithmetic"

__all__ = ["BUILT_IN_TASKS", "DEFAULT_TASK"]
