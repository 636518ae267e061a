"""Errors a pipeline run reports to the user as one line (see `rlhf_jax.pipeline.cli`).

Each names what is at fault; the `rlhf-jax` command prints `rlhf-jax <stage>: <kind> error:
<message>` and exits with code 2. The other kinds live next to the code that raises them:
`ConfigError` (`rlhf_jax.typed_config`), `DataError` (`pipeline.data_formats`) and `ModelError`
(`models.errors`).
"""
from __future__ import annotations


class OutputError(OSError):
    """The output directory (or a path inside it) cannot be written; the message names it."""


class CheckpointError(RuntimeError):
    """No checkpoint in the checkpoint folder can be restored; the message names the folder."""


class NonFiniteError(FloatingPointError):
    """Training produced NaN or inf: too many skipped updates in a row, a halt on a non-finite
    metric, or a checkpoint / exported model that would hold non-finite values (refused)."""


__all__ = ["OutputError", "CheckpointError", "NonFiniteError"]
