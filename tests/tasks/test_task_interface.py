"""The task interface: tasks load by name, unknown ones are config errors, and the pipeline
names no task."""
import re
from pathlib import Path

import pytest

import rlhf_jax.pipeline
import rlhf_jax.tasks
from rlhf_jax.typed_config import ConfigError
from rlhf_jax.pipeline.stages.quickstart import load_quickstart_config
from rlhf_jax.pipeline.tasks import Task, load_task, split_task_section


def test_every_built_in_task_loads_by_name():
    for name in rlhf_jax.tasks.BUILT_IN_TASKS:
        task = load_task(name)
        assert isinstance(task, Task) and task.name == name
        assert load_task(f"rlhf_jax.tasks.{name}:TASK") is task
        assert "correct" in task.reward_functions()


def test_unknown_tasks_and_keys_are_config_errors():
    with pytest.raises(ConfigError, match="unknown task 'sudoku'.*built-in tasks: arithmetic, countdown"):
        load_task("sudoku")
    with pytest.raises(ConfigError, match="unknown config key 'task.max_digits'"):
        split_task_section({"name": "countdown", "max_digits": 3})


def test_a_quickstart_config_naming_another_task_drops_the_default_tasks_keys(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text("task: {name: countdown, num_numbers: 4}\n")
    task, config = split_task_section(load_quickstart_config(path).task)
    assert task.name == "countdown" and config.num_numbers == 4


def test_the_pipeline_names_no_task():
    names = [re.escape(name) for name in rlhf_jax.tasks.BUILT_IN_TASKS]
    pattern = re.compile(rf"\b({'|'.join(names)})\b", re.IGNORECASE)
    for path in Path(rlhf_jax.pipeline.__file__).parent.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            assert not pattern.search(line), f"{path.name}:{number} names a task: {line.strip()}"
