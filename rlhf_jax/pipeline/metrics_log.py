"""Metrics logging: a JSON line per step, TensorBoard event files, optionally a Weights &
Biases run (`rlhf_jax.pipeline.wandb_log`), and a progress bar.

`metrics.jsonl` holds one object per `log` call: `{"step": 12, "loss": 0.41, ...}`. A resumed
run first cuts the file back to the rows with `step <= resume_step` (and tells TensorBoard to
drop later events), so the log of a killed-and-resumed run equals an uninterrupted run's.
Only the main process writes; on other processes every method is a no-op.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import sys
import time
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _scalar(value: Any, key: str) -> float | int | str | bool | None:
    """A JSON value for one metric: Python/NumPy/JAX scalars become float (ints stay int)."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"metric `{key}` must be a scalar, got an array of shape {array.shape}")
    item = array.reshape(()).item()
    if isinstance(item, bool):
        return item
    if isinstance(item, (int, float)):
        return float(item)
    raise ValueError(f"metric `{key}` has unsupported type {type(value).__name__}")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Rows of a metrics.jsonl file (or of `<dir>/metrics.jsonl` when given a directory).

    A last line without a newline (a write cut off by a kill) is ignored; any other line that
    is not a JSON object is a ValueError naming the file and line number.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"metrics file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    rows = []
    for number, line in enumerate(lines[:-1], start=1):  # lines[-1] is "" or a cut-off write
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


class MetricsLogger:
    """Writes metrics to `<out_dir>/metrics.jsonl` and TensorBoard events in `<out_dir>/tensorboard`.

    Args:
      out_dir: the run's output directory (created).
      is_main_process: only the main process writes (pass `jax.process_index() == 0`).
      tensorboard: also write TensorBoard event files (tensorboardX).
      wandb: also log to a Weights & Biases run: a dict of `WandbRun` options (`project`,
        `name`), None for none.
      resume_step: when resuming from a checkpoint at this step, keep the existing rows with
        `step <= resume_step` and drop the rest; None starts a fresh file.
    """

    def __init__(self, out_dir: str | os.PathLike, *, is_main_process: bool = True,
                 tensorboard: bool = True, wandb: Mapping[str, Any] | None = None,
                 resume_step: int | None = None):
        self.out_dir = os.fspath(out_dir)
        self.path = os.path.join(self.out_dir, METRICS_FILE)
        self.enabled = is_main_process
        self._file = None
        self._writer = None
        self._wandb = None
        if not self.enabled:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        if resume_step is None:
            self._file = open(self.path, "w", encoding="utf-8")
        else:
            self._truncate(resume_step)
            self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            # NaN/inf metrics are written as they are (and shown in metrics.jsonl and the
            # progress line); tensorboardX's per-value warning would only flood stderr.
            logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)

            log_dir = os.path.join(self.out_dir, TENSORBOARD_DIR)
            if resume_step is None:  # a fresh run replaces an earlier run's events
                for old in glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
                    os.remove(old)
            # Event file names carry whole seconds; the suffix keeps a quick resume from
            # overwriting the file it resumes. purge_step hides the older file's later events.
            self._writer = SummaryWriter(
                logdir=log_dir, filename_suffix=f".{time.time_ns()}",
                purge_step=None if resume_step is None else resume_step + 1)
        if wandb is not None:
            from rlhf_jax.pipeline.wandb_log import WandbRun

            try:
                self._wandb = WandbRun(self.out_dir, resume=resume_step is not None, **wandb)
            except BaseException:  # e.g. no wandb package: leave no open file or writer thread
                self.close()
                raise

    def _truncate(self, resume_step: int) -> None:
        """Rewrite metrics.jsonl with only the rows at or before `resume_step` (atomically)."""
        rows = read_metrics(self.path) if os.path.exists(self.path) else []
        kept = [row for row in rows if row.get("step", -math.inf) <= resume_step]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for row in kept:
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict | None:
        """Append `{"step": step, **metrics}` to the log; returns the row written."""
        if not self.enabled:
            return None
        if self._file is None:
            raise RuntimeError(f"MetricsLogger for {self.path} is closed")
        row = {"step": int(step)}
        for key, value in metrics.items():
            if key == "step":
                raise ValueError("metric name `step` is reserved for the step number")
            row[key] = _scalar(value, key)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(key, value, global_step=row["step"])
        if self._wandb is not None:
            self._wandb.log(row)
        return row

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _format_metric(value: Any) -> str:
    try:
        return f"{float(np.asarray(value)):.4g}"
    except (TypeError, ValueError):
        return str(value)


class ProgressBar:
    """A tqdm bar (ETA, rate) whose postfix shows a few chosen metrics."""

    def __init__(self, total: int | None, desc: str, enabled: bool,
                 keys: Sequence[str] | None = None, initial: int = 0):
        from tqdm.auto import tqdm

        self.keys = None if keys is None else tuple(keys)
        self._bar = tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True,
                         initial=initial, file=sys.stderr)

    @property
    def enabled(self) -> bool:
        return not self._bar.disable

    def update(self, n: int = 1, metrics: Mapping[str, Any] | None = None) -> None:
        """Advance by `n` steps and show `metrics` (only the chosen `keys`, if given)."""
        if metrics:
            shown = {k: v for k, v in metrics.items() if self.keys is None or k in self.keys}
            self._bar.set_postfix({k: _format_metric(v) for k, v in shown.items()}, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress(total: int | None, desc: str = "", enabled: bool | None = None, *,
             keys: Iterable[str] | None = None, is_main_process: bool = True,
             initial: int = 0) -> ProgressBar:
    """A progress bar with ETA; off on non-main processes and, by default, when stderr is not a tty.

    Args:
      total: number of steps (None for an open-ended bar).
      desc: label in front of the bar.
      enabled: force the bar on/off; None means "stderr is a terminal".
      keys: metric names to show in the postfix (None shows every metric passed to `update`).
      is_main_process: other processes never draw.
      initial: steps already done (a resumed run starts its bar there).
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    return ProgressBar(total, desc, bool(enabled and is_main_process), keys, initial)
