"""LoRA checkpoints without the frozen base: what is saved, the base's fingerprint, the resume check.

A LoRA run's carry holds the frozen base model inside each LoRA state (`LoRAApply.base`), but
the base never changes, so a checkpoint holds only what does: adapters, fully trained heads
(the reward / value `score` head), optimizer state, step, dropout key, the stage's RNG and data
position (`rlhf_jax.training.lora_state.without_frozen_base`). For a 0.5B-8B model that is a
few MB per save instead of gigabytes. On resume the stage builds its carry exactly as for a
fresh run, which re-reads the base from its source (`model.path` / `policy.path` / `value`, or
`model.init` / `policy.init` initialised from `seed`), restores the rest from the checkpoint and
puts the base back (`with_frozen_base`).

So that a resumed run cannot silently continue on another base, every checkpoint's metadata
records, for each LoRA state, a fingerprint of its base and the config key and value it came
from; resuming against a base with another fingerprint is a `CheckpointError` naming the key.

The fingerprint is a SHA-256 over every base leaf's path, shape, dtype and two 32-bit
checksums of its bit pattern: the wrapping sum of its words, and the wrapping sum of each word
times an odd multiplier of its position (so permuted or transposed values change it too). It
is integer math on the bits, so it is exact and the same whatever the device count, mesh
or sharding the base is read onto, and it costs one pass over weights already in memory, once
per run. A fingerprint of the source folder (path, file sizes, mtimes) would be cheaper but
wrong both ways: copying or moving a model folder (another machine, another mount) changes it
without changing a weight, and it says nothing of a freshly initialised base or of a
`model.dtype` that changes the loaded values.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.pipeline.errors import CheckpointError
from rlhf_jax.training import multihost
from rlhf_jax.training.lora_state import frozen_bases

META_KEY = "frozen_bases"  # the checkpoint metadata entry
_MULTIPLIER = 0x9E3779B1  # odd (golden-ratio hash constant): position weights are distinct mod 2**32


@dataclasses.dataclass(frozen=True)
class BaseSource:
    """Where a LoRA state's frozen base comes from: the config `key` that names it and its
    `value` (a folder, or a description of a fresh model)."""

    key: str
    value: str

    def text(self) -> str:
        return f"{self.key}={self.value}"


def model_source(section, key: str, seed: int) -> BaseSource:
    """The base source of a `ModelSection` read from config key `key` ("model" or "policy"):
    its folder, or a fresh `key.init` model drawn from `seed`."""
    if section.path:
        return BaseSource(f"{key}.path", os.fspath(section.path))
    return BaseSource(f"{key}.init", f"a fresh model from seed {seed}")


def _words(x):
    """The bit pattern of `x` as uint32 words (one per element; 8-byte elements give two)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = np.dtype(x.dtype).itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}
    if size in unsigned:
        return jax.lax.bitcast_convert_type(x, unsigned[size]).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8 bytes: a trailing axis of 2 words


def _checksums(leaves):
    """[n, 2] uint32: per leaf, the wrapping sum of its words and of words x position weight."""
    sums = []
    for leaf in leaves:
        words = _words(leaf)
        position = jnp.zeros(words.shape, jnp.uint32)
        stride = 1
        for axis in reversed(range(words.ndim)):  # the row-major index, built without a reshape
            position = position + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride)
            stride = (stride * words.shape[axis]) % 2**32
        weight = position * jnp.uint32(_MULTIPLIER) + jnp.uint32(1)
        sums.append(jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weight, dtype=jnp.uint32)]))
    return jnp.stack(sums) if sums else jnp.zeros((0, 2), jnp.uint32)


def tree_fingerprint(tree) -> str:
    """A hex SHA-256 of `tree`'s leaf paths, shapes, dtypes and bit-pattern checksums (module
    docstring). Equal for equal values whatever their sharding; a collective under several
    processes (call it on every process)."""
    named, _ = jax.tree_util.tree_flatten_with_path(tree)
    leaves = [jnp.asarray(leaf) if not isinstance(leaf, jax.Array) else leaf for _, leaf in named]
    sums = np.asarray(multihost.fetch(jax.jit(_checksums)(leaves)))
    digest = hashlib.sha256()
    for (path, leaf), (plain, weighted) in zip(named, sums):
        digest.update(f"{jax.tree_util.keystr(path)}|{tuple(leaf.shape)}|{np.dtype(leaf.dtype).name}|"
                      f"{int(plain)}|{int(weighted)};".encode())
    return digest.hexdigest()


def _top_key(name: str) -> str:
    return name.split(".", 1)[0]


def base_record(carry, sources: Mapping[str, BaseSource] | None = None) -> dict:
    """The checkpoint metadata entry for `carry`'s LoRA states: `{name: {"fingerprint", "key",
    "source"}}` (`sources` maps a top-level carry key, e.g. "policy", to its `BaseSource`);
    empty without LoRA states."""
    record = {}
    for name, base in frozen_bases(carry).items():
        source = (sources or {}).get(_top_key(name), BaseSource(f"`{_top_key(name)}`", "its model"))
        record[name] = {"fingerprint": tree_fingerprint(base), "key": source.key, "source": source.text()}
    return record


def check_base(saved: Mapping[str, Any] | None, current: Mapping[str, Any], where: str) -> None:
    """Raise a `CheckpointError` naming the config key when the checkpoint at `where` (its
    metadata's `saved` record) was trained on other frozen bases than `current` holds."""
    saved = dict(saved or {})
    if not current and not saved:
        return
    if not saved:
        raise CheckpointError(
            f"`lora`: the checkpoint {where} records no frozen base (it was written by a run without "
            f"`lora`, or before LoRA checkpoints left the base out); start over without --resume")
    for name in sorted(set(saved) | set(current)):
        old, new = saved.get(name), current.get(name)
        if old is None or new is None:
            state = _top_key(name)
            raise CheckpointError(
                f"`lora`: the checkpoint {where} {'has no' if old is None else 'has a'} LoRA state `{state}` "
                f"but this run {'has one' if old is None else 'does not'}; start over without --resume")
        if old["fingerprint"] != new["fingerprint"]:
            raise CheckpointError(
                f"`{new['key']}`: the frozen base differs from the one the checkpoint {where} was trained on "
                f"(then {old['source']}, now {new['source']}; fingerprint {old['fingerprint'][:12]} != "
                f"{new['fingerprint'][:12]}); resume with the same base model, or start over without --resume")


__all__ = ["META_KEY", "BaseSource", "model_source", "tree_fingerprint", "base_record", "check_base"]
