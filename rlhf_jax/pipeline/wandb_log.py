"""Weights & Biases logging of a stage's metrics (`logging.wandb: true`).

Every row the stage writes to metrics.jsonl is also logged to one W&B run, its x-axis the
`step` column, its config the run's config.yaml. The run's id is kept in
`<output_dir>/wandb_run_id`: a run started with `--resume` continues the same W&B run
(`resume="allow"`), and the steps it replays after the last checkpoint are logged again at
their own step. The usual environment variables apply (`WANDB_ENTITY`, `WANDB_MODE=offline`
without network, `WANDB_API_KEY`, ...); W&B's own files go to `<output_dir>/wandb`. Only the
main process logs. Needs the `wandb` package (`pip install "rlhf_jax[wandb]"`).
"""
from __future__ import annotations

import os
import uuid
from typing import Any, Mapping

import yaml

from rlhf_jax.typed_config import ConfigError

RUN_ID_FILE = "wandb_run_id"
DEFAULT_PROJECT = "rlhf-jax"


def _run_id(out_dir: str, resume: bool) -> str:
    """The W&B run id of `out_dir`: the recorded one when resuming, else a new one (recorded)."""
    path = os.path.join(out_dir, RUN_ID_FILE)
    if resume and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            recorded = f.read().strip()
        if recorded:
            return recorded
    run_id = uuid.uuid4().hex[:12]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(run_id + "\n")
    os.replace(path + ".tmp", path)
    return run_id


def _stage_config(out_dir: str) -> dict:
    """The run's config.yaml as a dict ({} without one)."""
    path = os.path.join(out_dir, "config.yaml")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


class WandbRun:
    """One W&B run fed the rows of a `MetricsLogger` (module docstring).

    Args:
      out_dir: the stage's output folder.
      project: W&B project (None: `WANDB_PROJECT`, else "rlhf-jax").
      name: the run's display name (None: the output folder's name).
      resume: continue the W&B run recorded in `out_dir` (a `--resume`d stage).
    """

    def __init__(self, out_dir: str, *, project: str | None = None, name: str | None = None,
                 resume: bool = False):
        try:
            import wandb
        except ImportError:
            raise ConfigError("`logging.wandb` is true but the wandb package is not installed: "
                              "pip install \"rlhf_jax[wandb]\", or set logging.wandb=false") from None
        out_dir = os.fspath(out_dir)
        self.run_id = _run_id(out_dir, resume)
        self._run = wandb.init(
            project=project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            name=name or os.path.basename(os.path.abspath(out_dir)), id=self.run_id, resume="allow",
            dir=out_dir, config=_stage_config(out_dir))
        self._run.define_metric("step")
        self._run.define_metric("*", step_metric="step")

    def log(self, row: Mapping[str, Any]) -> None:
        """Log one metrics row (`{"step": s, name: value, ...}`); strings are left out."""
        self._run.log({key: value for key, value in row.items() if not isinstance(value, str)})

    def finish(self) -> None:
        self._run.finish()


__all__ = ["WandbRun", "RUN_ID_FILE", "DEFAULT_PROJECT"]
