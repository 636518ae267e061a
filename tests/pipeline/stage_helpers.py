"""Shared set-up for the stage tests: a tiny task and tiny-model overrides."""
from __future__ import annotations

from pathlib import Path

from rlhf_jax.pipeline.tasks import write_jsonl
from rlhf_jax.tasks.arithmetic import TaskConfig, build_task

TINY_TASK = TaskConfig(seed=1, min_digits=1, max_digits=2, num_sft=96, num_preferences=64,
                       num_prompts=32, num_eval_prompts=8, num_eval_preferences=16)
TINY_MODEL = ("{model_type: llama, hidden_size: 32, num_layers: 1, num_heads: 2, "
              "intermediate_size: 64, max_position_embeddings: 32}")
LENGTHS = ["data.max_prompt_length=8", "data.max_response_length=8"]
QUIET = ["logging.tensorboard=true", "logging.progress=false", "mesh.data=1"]


def tiny_task(folder: Path):
    """The tiny task plus `eval_sft.jsonl` (held-out prompts with their answers)."""
    task = build_task(folder, TINY_TASK)
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in ((1, 2), (13, 4), (7, 7), (20, 31))]
    write_jsonl(folder / "eval_sft.jsonl", rows)
    return task


def sft_overrides(task, output_dir, *, steps: int = 6, extra=()) -> list[str]:
    return [
        f"output_dir={output_dir}", f"tokenizer={task.tokenizer_dir}", f"model.init={TINY_MODEL}",
        f"data.train_files=[{task.sft}]", f"data.eval_files=[{task.sft.parent / 'eval_sft.jsonl'}]",
        *LENGTHS, *QUIET, f"train.steps={steps}", "train.batch_size=8", "optim.learning_rate=0.003",
        "optim.warmup_steps=2", "eval.batch_size=8", "checkpoint.interval=3", "checkpoint.async_save=true",
        *extra,
    ]


def preference_overrides(task, output_dir, model_dir, *, steps: int = 4, extra=()) -> list[str]:
    return [
        f"output_dir={output_dir}", f"model.path={model_dir}", f"data.train_files=[{task.preferences}]",
        f"data.eval_files=[{task.eval_preferences}]", *LENGTHS, *QUIET, f"train.steps={steps}",
        "train.batch_size=8", "optim.learning_rate=0.001", "eval.batch_size=8", "checkpoint.interval=2",
        *extra,
    ]
