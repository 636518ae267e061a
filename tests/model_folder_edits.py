"""Damage a saved model folder in place, for the tests of the errors a broken folder gives."""
from __future__ import annotations

import safetensors.numpy


def edit_tensors(edit):
    """A function that loads `folder/model.safetensors`, calls `edit(tensors)` and writes it back."""
    def apply(folder):
        tensors = safetensors.numpy.load_file(folder / "model.safetensors")
        edit(tensors)
        safetensors.numpy.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return apply


def truncate_weights(fraction: float):
    """A function that cuts `folder/model.safetensors` to `fraction` of its bytes."""
    def apply(folder):
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: int(weights.stat().st_size * fraction)])
    return apply
