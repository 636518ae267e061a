"""Training checkpoints on orbax: state pytree + JSON metadata, atomic, resharding on restore.

One checkpoint is a step directory `<directory>/<step>/` with three items:

- `state`: any pytree of arrays (a flax `TrainState` with params and optimizer state, PRNG
  keys, counters). Typed PRNG keys (`jax.random.key`) are stored as their raw `uint32` key
  data and re-wrapped on restore, so a typed key and a raw `jax.random.PRNGKey` both survive.
- `meta`: a JSON dict (data position, config, length of the metrics history, ...).
- `layout`: which state leaves were typed keys and their PRNG implementation.

Orbax writes each step into `<step>.orbax-checkpoint-tmp-<time>/` and renames it when the
write is complete, so a run killed mid-save leaves a temporary directory that is never listed
as a step: `latest_step()` only sees finished checkpoints. What orbax cannot rule out is a
finished checkpoint damaged afterwards (a full disk, a storage crash truncating a file):
`restore_latest_readable` then falls back to the newest checkpoint that restores, and sets
the damaged ones aside as `<step>.unreadable/` (never listed as steps, so the resumed run
writes those steps afresh).
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from rlhf_jax.pipeline.errors import CheckpointError
from rlhf_jax.training.multihost import barrier

_ITEMS = ("state", "meta", "layout")


def _key_name(key) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _named_leaves(tree) -> dict[str, Any]:
    """Flatten a pytree to {'a.b.0': leaf}, the naming orbax uses for saved leaves."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {".".join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _is_typed_key(x) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_impl_name(key) -> str:
    """The PRNG implementation name of a typed key array or of its ShapeDtypeStruct."""
    if isinstance(key, jax.Array):
        return str(jax.random.key_impl(key))
    names = []
    jax.eval_shape(lambda k: names.append(str(jax.random.key_impl(k))), key)
    return names[0]


def _jsonable(value: Any, path: str) -> Any:
    """Convert numpy/jax scalars and tuples to JSON types; raise TypeError naming `path`."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"checkpoint meta key {path}.{key!r} must be a string")
            out[key] = _jsonable(item, f"{path}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(item, f"{path}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, (np.generic, np.ndarray, jax.Array)) and np.ndim(value) == 0:
        return np.asarray(value).item()
    if isinstance(value, (np.ndarray, jax.Array)):
        return np.asarray(value).tolist()
    raise TypeError(f"checkpoint meta {path} has a {type(value).__name__}, which is not JSON")


def _abstract_leaf(leaf, sharding):
    """The restore target for one storage leaf: a ShapeDtypeStruct carrying a sharding."""
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
        if sharding is None:
            sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    return leaf  # numpy arrays and Python scalars restore as themselves


class Checkpointer:
    """Saves and restores `(state, meta)` pairs under `directory`, one subdirectory per step.

    Args:
      directory: where step directories live; created unless `create=False`.
      save_interval_steps: `save(step, ...)` writes when `step % save_interval_steps == 0`
        (or with `force=True`); 0 saves only forced steps.
      max_to_keep: keep the newest this many checkpoints (None keeps all).
      async_save: write in a background thread after copying the arrays to host memory;
        `wait()` blocks until the write is finished.
      create: create `directory` if it does not exist; otherwise a missing directory is a
        FileNotFoundError naming it.
    """

    def __init__(self, directory: str | os.PathLike, *, save_interval_steps: int = 1,
                 max_to_keep: int | None = None, async_save: bool = True, create: bool = True):
        if save_interval_steps < 0:
            raise ValueError(f"save_interval_steps must be >= 0, got {save_interval_steps}")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        if not create and not os.path.isdir(self.directory):
            raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
        self.save_interval_steps = save_interval_steps
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=create, cleanup_tmp_directories=create,
            enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler(),
                           "layout": ocp.JsonCheckpointHandler()})

    # ----------------------------------------------------------------------------- saving
    def should_save(self, step: int, *, force: bool = False) -> bool:
        """Whether `save(step, ..., force=force)` would write a checkpoint."""
        if step in self.all_steps():
            return False
        if force:
            return True
        return self.save_interval_steps > 0 and step % self.save_interval_steps == 0

    def save(self, step: int, state: Any, meta: dict | None = None, *, force: bool = False) -> bool:
        """Save `state` (a pytree of arrays) and `meta` (a JSON dict) as checkpoint `step`.

        Returns True if a checkpoint was written: at an interval step, or any step with
        `force=True`. A step that already has a checkpoint is left alone (returns False), so
        a final forced save at an interval step is harmless.
        """
        if not self.should_save(step, force=force):
            return False
        meta_json = _jsonable(dict(meta or {}), "meta")
        typed_keys = {name: _key_impl_name(leaf)
                      for name, leaf in _named_leaves(state).items() if _is_typed_key(leaf)}
        storage = jax.tree.map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, state)
        self._manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(storage),
            meta=ocp.args.JsonSave(meta_json),
            layout=ocp.args.JsonSave({"typed_keys": typed_keys})))
        return True

    def wait(self) -> None:
        """Block until a background save has finished writing."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending writes and release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ----------------------------------------------------------------------------- listing
    def all_steps(self) -> list[int]:
        """Steps with a finished checkpoint, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step, or None if there is none."""
        return self._manager.latest_step()

    # ----------------------------------------------------------------------------- restoring
    def read_meta(self, step: int | None = None) -> dict:
        """The JSON metadata of checkpoint `step` (the latest if None), without its state."""
        self._manager.wait_until_finished()
        step = self._resolve_step(step)
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int | None = None, *, target: Any = None,
                shardings: Any = None) -> tuple[Any, dict]:
        """Restore checkpoint `step` (the latest if None) as `(state, meta)`.

        Args:
          step: which checkpoint; None means `latest_step()`.
          target: a pytree with the saved structure (real arrays, or `jax.ShapeDtypeStruct`s,
            e.g. from `jax.eval_shape`). Its containers are rebuilt (a `TrainState` comes
            back as a `TrainState`), typed-key leaves come back as typed keys, and each array
            is placed on the leaf's `.sharding`. Without a target the state comes back as
            nested dicts/lists on the saved shardings.
          shardings: overrides the placement: one `jax.sharding.Sharding` for every array, or
            a pytree of shardings with the target's structure. This is how a checkpoint
            written on one mesh is read onto another (a different device count or layout).
        A typed-key leaf in `target` may read a raw `uint32` key that was saved, and the
        other way round.

        Raises:
          FileNotFoundError naming the directory if there is no such checkpoint;
          ValueError naming the leaves if `target` does not match the saved tree.
        """
        self._manager.wait_until_finished()  # a pending background save becomes visible
        step = self._resolve_step(step)
        step_dir = os.path.join(self.directory, str(step))
        side = self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore(), layout=ocp.args.JsonRestore()))
        meta, typed_keys = side["meta"], side["layout"].get("typed_keys", {})
        if target is None:
            if shardings is not None:
                raise ValueError("restore(shardings=...) needs a `target` giving the tree structure")
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore()))["state"]
            named = _named_leaves(restored)
            wrapped = {n: jax.random.wrap_key_data(named[n], impl=impl) for n, impl in typed_keys.items()}
            leaves, treedef = jax.tree_util.tree_flatten(restored)
            leaves = [wrapped.get(name, leaf) for name, leaf in zip(named, leaves)]
            return jax.tree_util.tree_unflatten(treedef, leaves), meta

        storage_target = jax.tree.map(
            lambda x: jax.eval_shape(jax.random.key_data, x) if _is_typed_key(x) else x, target)
        if shardings is not None:
            if isinstance(shardings, jax.sharding.Sharding):
                storage_target = jax.tree.map(lambda x: _abstract_leaf(x, shardings), storage_target)
            else:
                try:
                    storage_target = jax.tree.map(_abstract_leaf, storage_target, shardings)
                except ValueError as err:
                    raise ValueError(f"restore: `shardings` must be one Sharding or a pytree with "
                                     f"the target's structure ({err})") from None
        else:
            storage_target = jax.tree.map(lambda x: _abstract_leaf(x, None), storage_target)
        self._check_matches(step, step_dir, storage_target)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(storage_target)))["state"]
        state = jax.tree.map(
            lambda want, got: (jax.random.wrap_key_data(got, impl=_key_impl_name(want))
                               if _is_typed_key(want) else got), target, restored)
        return state, meta

    def restore_latest_readable(self, *, target: Any = None, shardings: Any = None
                                ) -> tuple[Any, dict, list[tuple[int, str]]]:
        """Restore the newest checkpoint that can be read, as `(state, meta, skipped)`.

        Steps are tried newest first (`restore(step, target=..., shardings=...)`); `skipped`
        lists `(step, reason)` for the newer ones that failed, each moved to
        `<directory>/<step>.unreadable` so that it is no longer listed and the resumed run
        writes that step again. Raises `CheckpointError` naming the directory and each
        step's reason when none can be read (nothing is moved then), or when there are none.
        """
        self._manager.wait_until_finished()
        failures: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            try:
                with _quiet_abandoned_reads():
                    state, meta = self.restore(step, target=target, shardings=shardings)
            except Exception as err:  # orbax/tensorstore raise many types for damaged files
                failures.append((step, _reason(err)))
                continue
            if failures:
                self._set_aside([bad for bad, _ in failures])
            return state, meta, failures
        detail = "; ".join(f"step {step}: {reason}" for step, reason in failures) or "it holds none"
        raise CheckpointError(f"no readable checkpoint in {self.directory} ({detail})")

    def _set_aside(self, steps: list[int]) -> None:
        """Rename step directories to `<step>.unreadable` (process 0), then re-list steps."""
        if jax.process_index() == 0:
            for step in steps:
                source = os.path.join(self.directory, str(step))
                target, number = f"{source}.unreadable", 1
                while os.path.exists(target):
                    number += 1
                    target = f"{source}.unreadable{number}"
                os.replace(source, target)
        barrier("rlhf_jax_checkpoint_set_aside")
        self._manager.reload()

    def _resolve_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(
                    f"no finished checkpoint in {self.directory} (unfinished "
                    f"*.orbax-checkpoint-tmp-* directories are ignored)")
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; available steps: {steps}")
        return step

    def _check_matches(self, step: int, step_dir: str, storage_target: Any) -> None:
        """Compare the target's leaf names, shapes and dtypes with the saved ones."""
        saved_tree = self._manager.item_metadata(step)["state"]
        saved = _named_leaves(getattr(saved_tree, "tree", saved_tree))
        wanted = _named_leaves(storage_target)
        missing = sorted(set(wanted) - set(saved))
        extra = sorted(set(saved) - set(wanted))
        if missing or extra:
            raise ValueError(
                f"checkpoint {step_dir} does not match the restore target: "
                f"in target but not saved: {missing or 'none'}; saved but not in target: "
                f"{extra or 'none'}")
        for name, want in wanted.items():
            got = saved[name]
            want_shape = tuple(np.shape(want)) if not hasattr(want, "shape") else tuple(want.shape)
            got_shape = tuple(getattr(got, "shape", None) or ())
            if want_shape != got_shape:
                raise ValueError(f"checkpoint {step_dir}: leaf `{name}` has shape {got_shape}, "
                                 f"the restore target expects {want_shape}")
            if isinstance(got, ocp.metadata.ScalarMetadata):
                continue  # Python scalars are stored with a nominal 64-bit dtype
            want_dtype = getattr(want, "dtype", None)
            got_dtype = getattr(got, "dtype", None)
            if want_dtype is not None and got_dtype is not None and np.dtype(want_dtype) != np.dtype(got_dtype):
                raise ValueError(f"checkpoint {step_dir}: leaf `{name}` has dtype {got_dtype}, "
                                 f"the restore target expects {want_dtype}")


def _ignore_closed_loop(previous):
    def hook(unraisable):
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.ignores_closed_loop = True
    return hook


@contextlib.contextmanager
def _quiet_abandoned_reads():
    """Keep the aftermath of a failed restore off stderr: when one array cannot be read, orbax
    abandons the other reads of that checkpoint, and their asyncio tasks report 'Task
    exception was never retrieved' (asyncio's logger) or, when a read completes after
    orbax closed its event loop, 'Event loop is closed' (sys.unraisablehook), each with a
    traceback. The restore's own exception still propagates and is reported once. The
    filter of exactly that RuntimeError stays installed in `sys.unraisablehook` (such a read
    can finish after the restore returned); everything else reaches the previous hook."""
    asyncio_logger = logging.getLogger("asyncio")
    level = asyncio_logger.level
    asyncio_logger.setLevel(logging.CRITICAL)
    if not getattr(sys.unraisablehook, "ignores_closed_loop", False):
        sys.unraisablehook = _ignore_closed_loop(sys.unraisablehook)
    try:
        yield
    finally:
        gc.collect()  # abandoned tasks report when collected: collect them while quiet
        asyncio_logger.setLevel(level)


def _reason(err: Exception) -> str:
    """A short one-line account of why a restore failed (tensorstore messages run to pages)."""
    text = " ".join(str(err).split())
    text = text.split(" See full TensorStore details")[0].split(" [tensorstore_spec")[0]
    if len(text) > 240:  # keep what failed (the start) and the root cause (the end)
        text = f"{text[:120]} ... {text[-110:]}"
    return f"{type(err).__name__}: {text}"


def restore_checkpoint(directory: str | os.PathLike, step: int | None = None, *,
                       target: Any = None, shardings: Any = None) -> tuple[Any, dict]:
    """Read one checkpoint from an existing directory (see `Checkpointer.restore`)."""
    checkpointer = Checkpointer(directory, create=False, async_save=False)
    try:
        return checkpointer.restore(step, target=target, shardings=shardings)
    finally:
        checkpointer.close()

