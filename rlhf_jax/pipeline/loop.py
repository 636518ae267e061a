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
  step in the checkpoint's metadata, every `checkpoint.interval` steps and at the end. The
  frozen base of a LoRA state in the carry is left out (it never changes): the metadata
  records its fingerprint and source instead, and a resumed run, whose carry re-read the base
  from its source, checks the fingerprint and keeps that base (`rlhf_jax.pipeline.frozen_base`).
- Resume: with `resume=True` the latest finished checkpoint is restored (carry, data position),
  metrics.jsonl is cut back to its step, and training continues; the main process prints
  `[description] resuming from the checkpoint of step N (of M)`. With no checkpoint in
  `<output_dir>/checkpoints` (a new run, or a mistyped `output_dir`) the run starts from step 0
  after one `warning: --resume found no checkpoint in ...` line on stderr. A latest checkpoint that
  cannot be read (a file truncated after it was finished) is skipped with one warning line
  on stderr naming its step and why, and the newest readable one is used
  (`Checkpointer.restore_latest_readable`); when none is readable the run stops with a
  `CheckpointError` naming the checkpoint folder. On CPU with the same seed the
  resumed run ends with exactly the rows and parameters of an uninterrupted one: the batches
  are a function of the seed and position, and every step is deterministic. Without `resume`
  the run starts over and earlier checkpoints in the output dir are removed.
- Non-finite values: with `max_consecutive_skips` set and an optimizer that skips non-finite
  updates (`OptimizerConfig.nonfinite = "skip"`), every logged row and the progress line carry
  `optim/nonfinite_skips` (skipped so far) and `optim/consecutive_skips` (in a row, now); a
  run whose skips in a row reach `max_consecutive_skips` logs that step's row and stops with a
  `NonFiniteError`. With `halt_on_nonfinite` (`nonfinite = "halt"`) the first non-finite
  metric stops the run. Before any checkpoint is written the carry is checked: one that holds
  a NaN or inf is refused with a `NonFiniteError`, so the latest checkpoint is always finite.
- `stop_after=k` ends the run after k steps of this process without a final checkpoint, as if
  it had been killed (for testing resumption).
- A step function that compiles again after its first call raises RuntimeError: with fixed
  shapes, a recompilation inside the loop is a bug.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from rlhf_jax.pipeline.checkpoint import Checkpointer
from rlhf_jax.pipeline.batching import BatchIterator, DataPosition
from rlhf_jax.pipeline.errors import NonFiniteError
from rlhf_jax.pipeline.frozen_base import META_KEY, BaseSource, base_record, check_base
from rlhf_jax.pipeline.metrics_log import MetricsLogger, progress
from rlhf_jax.pipeline.stage_configs import CheckpointSection, LoggingSection
from rlhf_jax.training.lora_state import with_frozen_base, without_frozen_base
from rlhf_jax.training.nonfinite import CONSECUTIVE_SKIPS, SKIPS, has_skip_counters, nonfinite_leaves, skip_counts
from rlhf_jax.training.optim import check_finite

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


def _listing(names: Sequence[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _latest(checkpointer: Checkpointer) -> str:
    step = checkpointer.latest_step()
    return "none (nothing was saved)" if step is None else f"step {step}"


def checkpoint_dir(output_dir: str | os.PathLike) -> str:
    return os.path.join(os.fspath(output_dir), CHECKPOINT_DIR)


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
    max_consecutive_skips: int | None = None,
    halt_on_nonfinite: bool = False,
    base_sources: Mapping[str, BaseSource] | None = None,
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
        start, with a warning on stderr, when there is none).
      stop_after: end after this many steps of this run, without a final checkpoint.
      evaluate: `carry -> {name: value}` held-out metrics, merged into the step's row.
      eval_every: evaluate every N steps (0: only at the end); the end is always evaluated.
      description, progress_keys: progress-bar label and the metrics it shows.
      compiled: jitted functions (`jax.jit` outputs or `make_train_step` results) that must
        not compile again after the first step.
      meta: extra JSON values saved with every checkpoint (e.g. the config).
      is_main_process: whether this process writes logs (default `jax.process_index() == 0`).
      max_consecutive_skips: stop when an optimizer in the carry has skipped this many
        non-finite updates in a row (None: no skip counting; see the module docstring).
      halt_on_nonfinite: stop at the first step whose metrics hold a NaN or inf.
      base_sources: for each top-level carry key holding a LoRA state (e.g. "policy"), where
        its frozen base comes from (named in the error when a resume finds another base).
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
    bases = base_record(carry, base_sources)  # LoRA: the frozen bases' fingerprints
    if resume and checkpointer.latest_step() is not None:
        try:
            try:
                latest = checkpointer.read_meta()
            except Exception:  # a damaged latest checkpoint: restore_latest_readable reports it
                latest = None
            if latest is not None:  # before the restore, whose shape errors would be less clear
                check_base(latest.get(META_KEY), bases, f"{ckpt_dir}/{checkpointer.latest_step()}")
            stored, saved, skipped = checkpointer.restore_latest_readable(target=without_frozen_base(carry))
            check_base(saved.get(META_KEY), bases, f"{ckpt_dir}/{saved['step']}")
            carry = with_frozen_base(stored, carry)
        except BaseException:
            checkpointer.close()
            raise
        start = resumed_from = int(saved["step"])
        batches.restore(DataPosition(**saved["data_position"]))
        if skipped and main:
            steps = ", ".join(f"step {step} ({reason})" for step, reason in skipped)
            print(f"warning: unreadable checkpoint {steps} in {ckpt_dir} set aside as "
                  f"<step>.unreadable; resuming from step {start}", file=sys.stderr, flush=True)
        if main:
            print(f"[{description}] resuming from the checkpoint of step {start} (of {num_steps})", flush=True)
    elif resume and main:
        print(f"warning: --resume found no checkpoint in {ckpt_dir}; starting from step 0", file=sys.stderr,
              flush=True)
    count_skips = max_consecutive_skips is not None and has_skip_counters(carry)
    if count_skips and progress_keys is not None:
        progress_keys = (*progress_keys, SKIPS)
    logger = MetricsLogger(output_dir, is_main_process=main, tensorboard=logging.tensorboard,
                           wandb=logging.wandb_options(), resume_step=resumed_from if resume else None)
    bar = progress(num_steps, description, logging.progress, keys=progress_keys,
                   is_main_process=main, initial=start)

    def save(step: int, force: bool = False) -> None:
        if not checkpointer.should_save(step, force=force):
            return
        stored = without_frozen_base(carry)
        bad = nonfinite_leaves(stored)
        if bad:
            checkpointer.wait()
            raise NonFiniteError(
                f"{description}: refusing to write the checkpoint of step {step}: NaN or inf in "
                f"{_listing(bad)}; the latest checkpoint stays {_latest(checkpointer)}")
        position = batches.position
        checkpointer.save(step, stored, {
            "step": step, "data_position": {"epoch": position.epoch, "index": position.index},
            **({META_KEY: bases} if bases else {}), **dict(meta or {})}, force=force)

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
            if halt_on_nonfinite:
                try:
                    check_finite(metrics, step)
                except FloatingPointError as err:
                    raise NonFiniteError(f"{description}: {err} (optim.nonfinite = halt)") from None
            skips = skip_counts(carry) if count_skips else {}
            diverged = bool(skips) and skips[CONSECUTIVE_SKIPS] >= max_consecutive_skips
            is_last = step == num_steps
            evaluating = evaluate is not None and (is_last or (eval_every and step % eval_every == 0))
            if is_last or step % logging.every == 0 or evaluating or diverged:
                row = {**_host(metrics), **skips}
                if evaluating and not diverged:
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
            if diverged:
                checkpointer.wait()
                raise NonFiniteError(
                    f"{description}: stopped at step {step}: {skips[CONSECUTIVE_SKIPS]} optimizer updates "
                    f"in a row had NaN/inf gradients and were skipped (limit optim.max_consecutive_skips "
                    f"= {max_consecutive_skips}; {skips[SKIPS]} skipped in all); the latest checkpoint "
                    f"is {_latest(checkpointer)}. Lower the learning rate or check the data and model")
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


__all__ = ["LoopResult", "run_loop", "log_line", "checkpoint_dir", "CHECKPOINT_DIR"]
