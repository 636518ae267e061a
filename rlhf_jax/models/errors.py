"""The error a model or tokenizer folder raises when it cannot be loaded.

`ModelError(folder, what)` reads `<folder>: <what>`; `what` names the file or tensor at fault
(e.g. `model.safetensors: truncated ...`, `missing tensor 'lm_head.weight'`). It is a
ValueError, so callers that catch ValueError keep working; the `rlhf-jax` command reports it
as `rlhf-jax <stage>: model error: <folder>: <what>` with exit code 2.
"""
from __future__ import annotations

import os


class ModelError(ValueError):
    """A model or tokenizer folder that cannot be loaded (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike, what: str):
        self.folder = os.fspath(folder)
        self.what = what
        super().__init__(f"{self.folder}: {what}")

    def __reduce__(self):  # keep pickling (multiprocessing, pytest-xdist) working
        return type(self), (self.folder, self.what)


__all__ = ["ModelError"]
