"""Helpers for running one program as several processes (multi-host / multi-controller JAX).

Every process runs the same script. After `initialize_from_env()` (or
`rlhf_jax.training.distributed.initialize_distributed`) `jax.devices()` lists the devices of
all processes and a jitted step over a `Mesh` of them runs as one SPMD program; each process
owns its local devices' shards. What changes against a single process:

- data: each process loads only ITS rows of each global batch (`process_batch_rows` says which)
  and `global_batch` assembles the global arrays with
  `jax.make_array_from_process_local_data`, so the global batch, and therefore every update,
  does not depend on the number of processes;
- parameters: every process must start from identical values. `global_params` checks that
  (a fingerprint per leaf, compared across processes) and places them with the given shardings;
- results: `fetch` copies any array (replicated, or sharded over other processes' devices) to
  host memory on every process; `process_sum` / `process_mean` reduce host-side values (e.g.
  evaluation sums over each process's rows) across processes;
- side effects: only the main process (`is_main_process()`) writes logs and reports; all
  processes take part in checkpoint saves and restores (orbax coordinates them) and in every
  collective (`barrier`, `fetch`, `process_sum`, ...), in the same order.

In a single process every helper is the plain single-process operation (no collectives).
"""
from __future__ import annotations

import hashlib
import math
import os
from typing import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from rlhf_jax.training.distributed import DistributedConfig, initialize_distributed
from rlhf_jax.training.sharding import BATCH_AXES, batch_sharding, path_name

# Environment variables set by `rlhf_jax.training.launch` (JAX itself reads the first one).
ENV_COORDINATOR_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "RLHF_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "RLHF_JAX_PROCESS_ID"


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def distributed_config_from_env(environ: Mapping[str, str] | None = None, **overrides) -> DistributedConfig:
    """A `DistributedConfig` from JAX_COORDINATOR_ADDRESS, RLHF_JAX_NUM_PROCESSES and
    RLHF_JAX_PROCESS_ID (as `launch` sets them); unset variables stay None (the cluster's
    environment, e.g. SLURM, may then provide them). `overrides` set other fields
    (`initialization_timeout=...`)."""
    environ = os.environ if environ is None else environ
    return DistributedConfig(
        coordinator_address=environ.get(ENV_COORDINATOR_ADDRESS) or None,
        num_processes=_env_int(environ, ENV_NUM_PROCESSES),
        process_id=_env_int(environ, ENV_PROCESS_ID),
        **overrides,
    )


def initialize_from_env(environ: Mapping[str, str] | None = None, **overrides) -> bool:
    """`initialize_distributed(distributed_config_from_env(environ, **overrides))`: True if
    several processes were started, False for a single process."""
    return initialize_distributed(distributed_config_from_env(environ, **overrides))


def is_main_process() -> bool:
    """True on process 0, the one that writes logs, reports and other single-writer files."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches `barrier(name)` (the same name, in the same order)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------- data


def _batch_blocks(mesh: Mesh) -> int:
    """How many row blocks `batch_sharding(mesh)` cuts a batch into (data x fsdp)."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES if axis in mesh.axis_names)


def process_batch_rows(mesh: Mesh, global_batch_size: int) -> slice:
    """The rows `[start, stop)` of a global batch whose shards live on this process's devices
    (batch split over the mesh's ("data", "fsdp") axes, `batch_sharding`).

    A data loader feeds exactly these rows (`BatchIterator` with `process_index` /
    `process_count` takes block `process_index` of `process_count` equal blocks, which is this
    slice for meshes whose devices are ordered by process, as `make_mesh` builds them).
    Raises ValueError if this process's rows are not one contiguous block.
    """
    blocks = _batch_blocks(mesh)
    if global_batch_size < 1 or global_batch_size % blocks:
        raise ValueError(
            f"global batch size {global_batch_size} must be a positive multiple of the {blocks} "
            f"batch shards of the mesh {dict(mesh.shape)}"
        )
    sharding = batch_sharding(mesh)
    indices = sharding.addressable_devices_indices_map((global_batch_size,))
    rows = sorted({index[0].indices(global_batch_size)[:2] for index in indices.values()})
    start, stop = rows[0][0], rows[0][1]
    for begin, end in rows[1:]:
        if begin != stop:
            raise ValueError(
                f"process {jax.process_index()} holds batch rows {rows} of a global batch of "
                f"{global_batch_size}: not one contiguous block; order the mesh devices by process"
            )
        stop = end
    return slice(start, stop)


def global_batch(local_batch, mesh: Mesh, global_batch_size: int | None = None):
    """Global arrays, split over ("data", "fsdp"), from this process's rows of a batch.

    `local_batch` is a pytree of host arrays holding rows `process_batch_rows(mesh, B)` of
    the global batch. B is `global_batch_size`, by default inferred from the local rows and
    the share of the batch's blocks this process holds. In one process this is
    `jax.device_put` of the whole batch.
    """
    sharding = batch_sharding(mesh)
    leaves = jax.tree_util.tree_flatten_with_path(local_batch)[0]
    if not leaves:
        return local_batch
    if global_batch_size is None:
        local_rows = np.shape(leaves[0][1])[0] if np.ndim(leaves[0][1]) else 0
        blocks = _batch_blocks(mesh)
        local_blocks = process_batch_rows(mesh, blocks)
        global_batch_size = local_rows * blocks // (local_blocks.stop - local_blocks.start)
    rows = process_batch_rows(mesh, global_batch_size)
    for path, leaf in leaves:
        shape = np.shape(leaf)
        if not shape or shape[0] != rows.stop - rows.start:
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path)} has shape {shape} on process "
                f"{jax.process_index()}, which must feed rows [{rows.start}, {rows.stop}) of the "
                f"global batch of {global_batch_size}: leading axis {rows.stop - rows.start}"
            )
    if jax.process_count() == 1:
        return jax.device_put(local_batch, sharding)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            sharding, np.asarray(x), (global_batch_size, *np.shape(x)[1:])),
        local_batch,
    )


# ----------------------------------------------------------------------------- parameters


def _fingerprint(leaf) -> np.ndarray:
    """Two uint32 words of a BLAKE2 digest of a host array's dtype, shape and bytes."""
    host = np.ascontiguousarray(leaf)
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{host.dtype}{host.shape}".encode())
    digest.update(host.tobytes())
    return np.frombuffer(digest.digest(), np.uint32)


def assert_same_across_processes(tree, name: str = "value") -> None:
    """Raise ValueError unless every process holds the same `tree` (host values: arrays,
    numbers, strings, all leaves compared by fingerprint). The message names the first leaf
    that differs and the processes that disagree with process 0. A collective: every process
    must call it."""
    if jax.process_count() == 1:
        return
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    counts = _allgather(np.asarray([len(leaves)], np.uint32))[:, 0]
    if len(set(counts.tolist())) > 1:
        raise ValueError(f"{name} differs between processes: leaf counts per process {counts.tolist()}")
    if not leaves:
        return
    fingerprints = np.stack([_fingerprint(np.asarray(leaf)) for _, leaf in leaves])
    gathered = _allgather(fingerprints)  # [P, leaves, 2]
    differs = np.any(gathered != gathered[:1], axis=-1)  # [P, leaves]
    if differs.any():
        leaf = int(np.argmax(differs.any(axis=0)))
        processes = np.nonzero(differs[:, leaf])[0].tolist()
        leaf_name = path_name(leaves[leaf][0])
        raise ValueError(
            f"{name} differs between processes: leaf {leaf_name!r} on process(es) {processes} is "
            f"not the same as on process 0 (every process must start from identical values: "
            "same seed, same checkpoint, same config)"
        )


def global_params(params, shardings, *, check_same: bool = True):
    """Place host-local `params` (the same values on every process) with `shardings` (a tree
    of `NamedSharding`s over all processes' devices, e.g. `param_shardings(...)`, or one
    sharding for every leaf).

    With `check_same` the values are first compared across processes
    (`assert_same_across_processes`), so a process that initialised with another seed fails
    here with the leaf's name rather than training silently on inconsistent replicas. Leaves
    that are already global arrays are resharded as they are.
    """
    host_leaves = {}

    def is_global(leaf):
        return isinstance(leaf, jax.Array) and not leaf.is_fully_addressable

    def to_host(path, leaf):
        if is_global(leaf):
            return leaf
        host = np.asarray(jax.device_get(leaf))
        host_leaves[path_name(path)] = host
        return host

    host_params = jax.tree_util.tree_map_with_path(to_host, params)
    if check_same:
        assert_same_across_processes(host_leaves, "params")

    def place(leaf, sharding):
        if is_global(leaf):
            return jax.device_put(leaf, sharding)
        return jax.make_array_from_callback(leaf.shape, sharding, lambda index: leaf[index])

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda leaf: place(leaf, shardings), host_params)
    return jax.tree.map(place, host_params, shardings)


# ----------------------------------------------------------------------------- results


def fetch(tree):
    """Host (NumPy) copies of every array leaf, on every process.

    Fully addressable arrays are copied; arrays replicated over all devices are read from a
    local copy; arrays sharded over other processes' devices are all-gathered, all in one
    compiled call (a collective: call `fetch` on every process with the same tree).
    Non-array leaves are returned unchanged.
    """
    leaves, treedef = jax.tree.flatten(tree)
    gather = [i for i, leaf in enumerate(leaves)
              if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable and not leaf.is_fully_replicated]
    if gather:
        targets = [_replicated_like(leaves[i].sharding) for i in gather]
        gathered = jax.jit(_identity, out_shardings=targets)([leaves[i] for i in gather])
        for i, value in zip(gather, gathered):
            leaves[i] = value

    def one(leaf):
        if not isinstance(leaf, jax.Array):
            return leaf
        if leaf.is_fully_addressable:
            return np.asarray(jax.device_get(leaf))
        return np.asarray(leaf.addressable_data(0))  # replicated: any local copy

    return jax.tree.unflatten(treedef, [one(leaf) for leaf in leaves])


def _identity(tree):
    return tree


def _replicated_like(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    devices = np.asarray(sorted(sharding.device_set, key=lambda device: device.id))
    return jax.sharding.NamedSharding(Mesh(devices, ("devices",)), jax.sharding.PartitionSpec())


def _allgather(host: np.ndarray) -> np.ndarray:
    """`[P, ...]`: this host array from every process (same shape everywhere). 64-bit arrays
    travel as uint32 words, so nothing is rounded to float32 on the way."""
    host = np.ascontiguousarray(host)
    if jax.process_count() == 1:
        return host[None]
    if host.dtype.itemsize == 8:
        words = np.asarray(multihost_utils.process_allgather(host.reshape(-1).view(np.uint32)))
        return words.view(host.dtype).reshape(jax.process_count(), *host.shape)
    return np.asarray(multihost_utils.process_allgather(host))


def process_sum(tree):
    """Sum over processes of host values (numbers or arrays; each leaf of one shape on every
    process), in one collective. Integer and bool leaves come back as int64, others as
    float64."""
    leaves, treedef = jax.tree.flatten(jax.tree.map(np.asarray, tree))
    if not leaves:
        return tree
    flat = np.concatenate([leaf.astype(np.float64).ravel() for leaf in leaves])
    totals = _allgather(flat).sum(axis=0)
    out, offset = [], 0
    for leaf in leaves:
        total = totals[offset: offset + leaf.size].reshape(leaf.shape)
        offset += leaf.size
        exact = np.issubdtype(leaf.dtype, np.integer) or leaf.dtype == bool
        out.append(np.rint(total).astype(np.int64) if exact else total)
    return jax.tree.unflatten(treedef, out)


def from_main_process(tree):
    """Process 0's host values (numbers or arrays, each leaf of one shape and dtype on every
    process) on every process, exactly (one collective); with one process, `tree` as NumPy.
    What one process computed on the host, e.g. reward scores, so that every process feeds
    the same values to the next compiled step."""
    leaves, treedef = jax.tree.flatten(jax.tree.map(np.asarray, tree))
    if not leaves or jax.process_count() == 1:
        return jax.tree.unflatten(treedef, leaves)
    flat = np.concatenate([leaf.astype(np.float64).ravel() for leaf in leaves])
    values = _allgather(flat)[0]
    out, offset = [], 0
    for leaf in leaves:
        out.append(values[offset: offset + leaf.size].reshape(leaf.shape).astype(leaf.dtype))
        offset += leaf.size
    return jax.tree.unflatten(treedef, out)


def process_mean(tree, weight=None):
    """Mean over processes of host values, as float64. With `weight` (this process's count,
    e.g. its number of evaluated rows or tokens) the weighted mean `sum_p w_p x_p / sum_p w_p`,
    which is the global mean when each `x_p` is a mean over `w_p` items."""
    if weight is None:
        count = jax.process_count()
        return jax.tree.map(lambda total: np.asarray(total, np.float64) / count, process_sum(tree))
    weight = np.asarray(weight, np.float64)
    weighted = jax.tree.map(lambda x: np.asarray(x, np.float64) * weight, tree)
    totals, weights = process_sum((weighted, weight))
    return jax.tree.map(lambda total: total / np.maximum(weights, np.finfo(np.float64).tiny), totals)


__all__ = [
    "ENV_COORDINATOR_ADDRESS", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID",
    "distributed_config_from_env", "initialize_from_env", "is_main_process", "barrier",
    "process_batch_rows", "global_batch", "assert_same_across_processes", "global_params",
    "fetch", "from_main_process", "process_sum", "process_mean",
]
