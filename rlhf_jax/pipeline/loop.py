"""The training loop every pipeline stage shares: resumable, logged, checkpointed.

    result = run_loop(output_dir=..., carry={"state": state, "rng": rng}, step_fn=step,
                      batches=BatchIterator(...), prepare_batch=to_device, num_steps=1000,
                      checkpoint=config.checkpoint, logging=config.logging, resume=resume)

One loop step takes the next batch of `batches` (a `rlhf_jax.pipeline.batching.BatchIterator`),
turns it into device arrays (`prepare_batch`) and calls `step_fn(carry, batch) -> (carry,
metrics)`, a compiled function with fixed shapes whose carry buffers are donated. The carry is
any pytree of arrays: a train state and an RNG key for SFT / reward / DPO; policy, value and
KL-controller states for PPO.

- Metrics: a row `{"step": s, **metrics}` in `<output_dir>/metrics.jsonl` and TensorBoard
  every `logging.every` steps and at the last step (and, when no progress bar is drawn, e.g.
  output not to a terminal, one printed line `[stage] step s/N  key value ...`); evaluation metrics (`evaluate(carry)`,
  every `eval_every` steps and at the end) join that step's row. No wall-clock values go into
  the rows, so two runs with the same seed write identical files.
- Checkpoints (`<output_dir>/checkpoints/<step>`): the carry, plus the data position and the
  step in the checkpoint's metadata, every `checkpoint.interval` steps and at the end.
- Resume: with `resume=True` the latest finished checkpoint is restored (carry, data position),
  metrics.jsonl is cut back to its step, and training continues. On CPU with the same seed the
  resumed run ends with exactly the rows and parameters of an uninterrupted one: the batches
  are a function of the seed and position, and every step is deterministic. Without `resume`
  the run starts over and earlier checkpoints in the output dir are removed.
- `stop_after=k` ends the run after k steps of this process without a final checkpoint, as if
  it had been killed (for testing resumption).
- A step function that compiles again after its first call raises RuntimeError: with fixed
  shapes, a recompilation inside the loop is a bug.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from rlhf_jax.pipeline.checkpoint import Checkpointer
from rlhf_jax.pipeline.batching import BatchIterator, DataPosition
from rlhf_jax.pipeline.metrics_log import MetricsLogger, progress
from rlhf_jax.pipeline.recipes import CheckpointSection, LoggingSection
from rlhf_jax.training.sharding import batch_sharding, replicated

CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass
class LoopResult:
    """What `run_loop` ends with."""

    carry: Any  # the final carry (train states, keys)
    step: int  # steps done in total (resumed ones included)
    finished: bool  # reached `num_steps` (False when `stop_after` ended the run)
    resumed_from: int | None  # the checkpoint step this run continued from
    last_metrics: dict  # the last row written (host values)
    seconds: float  # wall-clock time of this run's loop (compilation included)
    steps_per_second: float  # after the first step (compilation excluded)


def _host(metrics: Mapping[str, Any]) -> dict:
    return {name: np.asarray(value) for name, value in jax.device_get(dict(metrics)).items()}


def _cache_sizes(compiled: Sequence[Callable]) -> list[int]:
    return [fn._cache_size() if hasattr(fn, "_cache_size") else 0 for fn in compiled]


def log_line(description: str, step: int, num_steps: int, row: Mapping[str, Any],
             keys: Sequence[str] | None) -> str:
    """`[description] step s/N  key value ...` for the `keys` present in `row` (all scalars
    when `keys` is None; at most 8)."""
    names = [name for name in (keys if keys is not None else row) if name in row][:8]
    shown = []
    for name in names:
        try:
            shown.append(f"{name} {float(np.asarray(row[name])):.4g}")
        except (TypeError, ValueError):
            continue
    return f"[{description}] step {step}/{num_steps}  " + "  ".join(shown)


def checkpoint_dir(output_dir: str | os.PathLike) -> str:
    return os.path.join(os.fspath(output_dir), CHECKPOINT_DIR)


def compile_train_step(step: Callable, *, mesh, state_shardings, **options) -> Callable:
    """`jit(step)(state, batch) -> (state, metrics)` with the state donated and kept on
    `state_shardings`, the batch split over the mesh's batch axes, metrics replicated, and the
    static `options` bound (e.g. `sft_step`, `label_smoothing=0.1`). The result has the jit
    cache (`_cache_size`) that `run_loop(compiled=...)` watches, which is why this is not
    `rlhf_jax.training.step_runner.make_train_step`: that returns a Python wrapper choosing
    between two jitted functions, and its caches cannot be watched."""

    def bound(state, batch):
        return step(state, batch, **options)

    return jax.jit(bound, in_shardings=(state_shardings, batch_sharding(mesh)),
                   out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0)


def run_loop(
    *,
    output_dir: str | os.PathLike,
    carry: Any,
    step_fn: Callable[[Any, Any], tuple[Any, Mapping[str, Any]]],
    batches: BatchIterator,
    prepare_batch: Callable[[dict], Any],
    num_steps: int,
    checkpoint: CheckpointSection,
    logging: LoggingSection,
    resume: bool = False,
    stop_after: int | None = None,
    evaluate: Callable[[Any], Mapping[str, float]] | None = None,
    eval_every: int = 0,
    description: str = "train",
    progress_keys: Sequence[str] | None = None,
    compiled: Sequence[Callable] = (),
    meta: Mapping[str, Any] | None = None,
    is_main_process: bool | None = None,
) -> LoopResult:
    """Train for `num_steps` steps (see the module docstring).

    Args:
      output_dir: the stage's output folder (metrics.jsonl, tensorboard/, checkpoints/).
      carry: the initial pytree of arrays; on resume it is the restore target (structure,
        shapes, dtypes and shardings), so build it exactly as for a fresh run.
      step_fn: `(carry, batch) -> (carry, metrics)`; metrics are scalar arrays.
      batches: the batch iterator (its position is saved and restored).
      prepare_batch: host batch dict -> the `batch` argument of `step_fn`.
      num_steps: total steps of the stage.
      checkpoint, logging: the stage config's sections.
      resume: continue from the latest checkpoint in `<output_dir>/checkpoints` (a fresh
        start when there is none).
      stop_after: end after this many steps of this run, without a final checkpoint.
      evaluate: `carry -> {name: value}` held-out metrics, merged into the step's row.
      eval_every: evaluate every N steps (0: only at the end); the end is always evaluated.
      description, progress_keys: progress-bar label and the metrics it shows.
      compiled: jitted functions (`jax.jit` outputs) that must not compile again after the
        first step.
      meta: extra JSON values saved with every checkpoint (e.g. the config).
      is_main_process: whether this process writes logs (default `jax.process_index() == 0`).
    """
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after must be >= 1 or None, got {stop_after}")
    main = jax.process_index() == 0 if is_main_process is None else is_main_process
    ckpt_dir = checkpoint_dir(output_dir)
    if not resume and main and os.path.isdir(ckpt_dir):
        shutil.rmtree(ckpt_dir)  # a fresh run must not see an earlier run's steps
    checkpointer = Checkpointer(ckpt_dir, save_interval_steps=checkpoint.interval,
                                max_to_keep=checkpoint.keep, async_save=checkpoint.async_save)
    start, resumed_from = 0, None
    if resume and checkpointer.latest_step() is not None:
        carry, saved = checkpointer.restore(target=carry)
        start = resumed_from = int(saved["step"])
        batches.restore(DataPosition(**saved["data_position"]))
    logger = MetricsLogger(output_dir, is_main_process=main, tensorboard=logging.tensorboard,
                           resume_step=resumed_from if resume else None)
    bar = progress(num_steps, description, logging.progress, keys=progress_keys,
                   is_main_process=main, initial=start)

    def save(step: int, force: bool = False) -> None:
        position = batches.position
        checkpointer.save(step, carry, {
            "step": step, "data_position": {"epoch": position.epoch, "index": position.index},
            **dict(meta or {})}, force=force)

    step, last_row, sizes = start, {}, None
    stop_at = num_steps if stop_after is None else min(num_steps, start + stop_after)
    began = time.perf_counter()
    first_done = None
    try:
        while step < stop_at:
            carry, metrics = step_fn(carry, prepare_batch(next(batches)))
            step += 1
            if first_done is None:
                jax.block_until_ready(metrics)
                first_done, sizes = time.perf_counter(), _cache_sizes(compiled)
            is_last = step == num_steps
            evaluating = evaluate is not None and (is_last or (eval_every and step % eval_every == 0))
            if is_last or step % logging.every == 0 or evaluating:
                row = _host(metrics)
                if evaluating:
                    row.update(evaluate(carry))
                last_row = logger.log(step, row) or row
                bar.update(1, row)
                if main and not bar.enabled:  # no bar (not a terminal): one plain line per logged row
                    print(log_line(description, step, num_steps, row, progress_keys), flush=True)
                now = _cache_sizes(compiled)
                if now != sizes:
                    raise RuntimeError(f"{description}: a step function compiled again at step {step} "
                                       f"(jit cache sizes {sizes} -> {now}); shapes must stay fixed")
            else:
                bar.update(1)
            save(step, force=is_last)
        jax.block_until_ready(carry)
    finally:
        bar.close()
        logger.close()
        checkpointer.close()
    seconds = time.perf_counter() - began
    timed_steps = step - start - 1
    rate = timed_steps / (time.perf_counter() - first_done) if first_done and timed_steps > 0 else 0.0
    return LoopResult(carry=carry, step=step, finished=step >= num_steps, resumed_from=resumed_from,
                      last_metrics=dict(last_row), seconds=seconds, steps_per_second=rate)


__all__ = ["LoopResult", "compile_train_step", "run_loop", "log_line", "checkpoint_dir", "CHECKPOINT_DIR"]
