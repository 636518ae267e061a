"""Device mesh and shardings, as configuration.

The mesh has three named axes, `("data", "fsdp", "tensor")`:

- batches are split along their leading axis over `("data", "fsdp")` (`batch_sharding`);
- parameters are replicated (plain data parallelism) or, FSDP-style, each large parameter is
  split along one axis over `"fsdp"` (`param_shardings`); explicit `(regex, PartitionSpec)`
  rules override that default per parameter path, which is where tensor parallelism over
  `"tensor"` is configured;
- optimizer state (and a whole train state) follows its parameters (`shardings_like_params`).

Training steps are then `jax.jit(step, in_shardings=..., out_shardings=...)` and XLA inserts
the collectives (all-reduce of gradients for data parallelism; all-gather of parameters and
reduce-scatter of gradients for FSDP). For code that writes its collectives by hand under
`jax.shard_map` (or `jax.pmap`), `cross_replica_mean(tree, axis_name)` is the gradient
all-reduce, a no-op when `axis_name` is None.

Meshes use `AxisType.Auto` axes: shardings are propagated by the compiler, and the step
functions need no sharding annotations of their own.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass
class MeshConfig:
    data: int = -1  # data-parallel replicas; -1 = all devices not used by the other axes
    fsdp: int = 1  # parameter/optimizer-state shards (also splits the batch)
    tensor: int = 1  # tensor-parallel shards (used only by explicit sharding rules)


def mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Axis sizes `(data, fsdp, tensor)` for `num_devices`, resolving one -1 entry."""
    sizes = [config.data, config.fsdp, config.tensor]
    for name, size in zip(MESH_AXES, sizes):
        if size == 0 or size < -1:
            raise ValueError(f"mesh axis `{name}` must be a positive size or -1, got {size}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data/fsdp/tensor = {sizes}")
    known = math.prod(size for size in sizes if size != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"cannot fill mesh axis `{MESH_AXES[sizes.index(-1)]}` = -1: {num_devices} devices "
                f"are not divisible by the other axes' product {known} (data/fsdp/tensor = {sizes})"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh data x fsdp x tensor = {sizes[0]} x {sizes[1]} x {sizes[2]} = {math.prod(sizes)} "
            f"does not match the {num_devices} available devices"
        )
    return tuple(sizes)


def make_mesh(config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` with axes ("data", "fsdp", "tensor") over `devices` (default: all devices of
    all processes). Default config: every device on "data"."""
    config = MeshConfig() if config is None else config
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ("data", "fsdp"); other axes unsplit."""
    return NamedSharding(mesh, PartitionSpec(_batch_axes(mesh)))


def shard_batch(batch, mesh: Mesh):
    """Place every leaf of `batch` with `batch_sharding(mesh)`.

    One process: `batch` is the global batch, put with `jax.device_put`. Several processes:
    `batch` is this process's share (its rows of the global batch) and the global arrays are
    assembled with `jax.make_array_from_process_local_data`.
    """
    sharding = batch_sharding(mesh)
    shards = math.prod(mesh.shape[axis] for axis in _batch_axes(mesh))
    if jax.process_count() > 1:
        shards = max(1, shards // jax.process_count())
    for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
        shape = jnp.shape(leaf)
        if not shape or shape[0] % shards:
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path)} with shape {shape} cannot be split over "
                f"{shards} batch shards (mesh axes {_batch_axes(mesh)}); its leading axis must be a "
                f"multiple of {shards}"
            )
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def path_name(path) -> str:
    """A key path as "a/b/c" (the form `param_shardings` rules match against)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _check_spec(spec: PartitionSpec, shape, mesh: Mesh, name: str) -> None:
    if len(spec) > len(shape):
        raise ValueError(f"sharding rule {spec} for parameter {name!r} has more entries than its shape {shape}")
    for dim, axes in zip(shape, spec):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        for axis in axes:
            if axis not in mesh.axis_names:
                raise ValueError(f"sharding rule {spec} for parameter {name!r} names unknown mesh axis {axis!r}")
        size = math.prod(mesh.shape[axis] for axis in axes)
        if dim % size:
            raise ValueError(
                f"sharding rule {spec} for parameter {name!r}: dimension {dim} of shape {shape} "
                f"is not divisible by the mesh size {size} of {axes}"
            )


def fsdp_spec(shape, fsdp_size: int, *, min_size: int) -> PartitionSpec:
    """Split the largest axis divisible by `fsdp_size` (the first one on ties) over "fsdp";
    replicate parameters with fewer than `min_size` elements or no divisible axis."""
    if fsdp_size <= 1 or math.prod(shape) < min_size:
        return PartitionSpec()
    candidates = [axis for axis, dim in enumerate(shape) if dim % fsdp_size == 0]
    if not candidates:
        return PartitionSpec()
    axis = max(candidates, key=lambda a: (shape[a], -a))
    return PartitionSpec(*([None] * axis), "fsdp")


def param_shardings(
    params,
    mesh: Mesh,
    *,
    fsdp: bool = True,
    min_size: int = 2**14,
    rules: Sequence[tuple[str, PartitionSpec]] = (),
):
    """A `NamedSharding` for every leaf of `params` (arrays or `jax.ShapeDtypeStruct`s).

    Per leaf, the first rule whose regex matches the leaf's "a/b/c" path (`re.search`) gives
    its `PartitionSpec`; otherwise, with `fsdp=True` and a mesh "fsdp" axis larger than 1,
    `fsdp_spec` splits leaves of at least `min_size` elements along their largest divisible
    axis; everything else is replicated.
    """
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]
    fsdp_size = mesh.shape["fsdp"] if fsdp and "fsdp" in mesh.axis_names else 1

    def leaf_sharding(path, leaf):
        name, shape = path_name(path), tuple(jnp.shape(leaf))
        for pattern, spec in compiled:
            if pattern.search(name):
                _check_spec(spec, shape, mesh, name)
                return NamedSharding(mesh, spec)
        return NamedSharding(mesh, fsdp_spec(shape, fsdp_size, min_size=min_size))

    return jax.tree_util.tree_map_with_path(leaf_sharding, params)


def shard_params(params, shardings):
    """Place `params` with `shardings` (a matching tree of shardings, e.g. from
    `param_shardings`). In several processes every process passes the same full values."""
    return jax.device_put(params, shardings)


def shardings_like_params(tree, params, param_shardings_tree, mesh: Mesh):
    """Shardings for a tree that holds copies of the parameters: optimizer state, a train state.

    A leaf whose key path ends with a parameter's key path and has that parameter's shape
    gets that parameter's sharding (Adam's `mu`/`nu`, accumulated gradients, `state.params`);
    any other leaf (step counters, scalars, factored statistics) is replicated. `tree` and
    `params` may be abstract (`jax.eval_shape` outputs).
    """
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_shardings = jax.tree.leaves(param_shardings_tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    if len(flat_params) != len(flat_shardings):
        raise ValueError(
            f"`param_shardings_tree` has {len(flat_shardings)} leaves but `params` has {len(flat_params)}"
        )
    by_path = {tuple(path): (tuple(jnp.shape(leaf)), sharding)
               for (path, leaf), sharding in zip(flat_params, flat_shardings)}

    def leaf_sharding(path, leaf):
        path = tuple(path)
        for start in range(len(path) + 1):
            match = by_path.get(path[start:])
            if match is not None and match[0] == tuple(jnp.shape(leaf)):
                return match[1]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def opt_state_shardings(optimizer, params, param_shardings_tree, mesh: Mesh):
    """Shardings for `optimizer.init(params)`, found without allocating it."""
    abstract_state = jax.eval_shape(optimizer.init, params)
    return shardings_like_params(abstract_state, params, param_shardings_tree, mesh)


def cross_replica_mean(tree, axis_name: str | tuple[str, ...] | None):
    """`lax.pmean` of every leaf over `axis_name` (inside `shard_map`/`pmap`); identity when
    `axis_name` is None. Averaging per-device mean losses equals the global mean only when
    every device holds the same number of counted elements; otherwise all-reduce sums and
    counts (`lax.psum`) and divide."""
    if axis_name is None:
        return tree
    return jax.lax.pmean(tree, axis_name)


__all__ = [
    "MESH_AXES", "BATCH_AXES", "MeshConfig", "mesh_shape", "make_mesh", "replicated",
    "batch_sharding", "shard_batch", "path_name", "fsdp_spec", "param_shardings", "shard_params",
    "shardings_like_params", "opt_state_shardings", "cross_replica_mean",
]
