"""Checkpointer: exact round trips, step bookkeeping, resharding on restore, clear errors."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rlhf_jax.pipeline.checkpoint import Checkpointer, restore_checkpoint


class _TinyMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.relu(nn.Dense(5)(x)))


def _trained_state(seed=0, steps=2):
    """A TrainState whose adamw moments and step counter are non-trivial (jitted: fast)."""
    model = _TinyMLP()
    tx = optax.adamw(1e-2, weight_decay=0.1)
    x = jax.random.normal(jax.random.key(seed + 1), (8, 4))

    @jax.jit
    def build():
        params = model.init(jax.random.key(seed), jnp.ones((1, 4)))
        state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
        for _ in range(steps):
            grads = jax.grad(lambda p: jnp.mean(model.apply(p, x) ** 2))(state.params)
            state = state.apply_gradients(grads=grads)
        return state

    return build()


def _assert_trees_identical(got, want):
    got_leaves, got_def = jax.tree_util.tree_flatten(got)
    want_leaves, want_def = jax.tree_util.tree_flatten(want)
    assert got_def == want_def
    for g, w in zip(got_leaves, want_leaves):
        if jax.dtypes.issubdtype(getattr(w, "dtype", np.float32), jax.dtypes.prng_key):
            assert g.dtype == w.dtype
            g, w = jax.random.key_data(g), jax.random.key_data(w)
        if isinstance(w, (int, float)):  # a Python scalar leaf (TrainState.step outside jit)
            assert g == w
            continue
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)  # bit-identical, no tolerance


def _full_state():
    return {
        "train": _trained_state(),
        "rng": jax.random.key(7),
        "raw_rng": jax.random.PRNGKey(11),
        "rbg_rng": jax.random.key(3, impl="rbg"),
        "counter": jnp.int32(5),
        "epoch": 3,  # a Python scalar leaf
    }


def test_round_trip_is_exact_with_typed_and_raw_keys(tmp_path):
    state = _full_state()
    meta = {"epoch": 1, "index": np.int64(17), "config": {"lr": 1e-3, "name": "sft"},
            "metrics_rows": 42, "history": (1.5, np.float32(2.0))}
    with Checkpointer(tmp_path / "ckpt", save_interval_steps=1) as ckpt:
        assert ckpt.save(3, state, meta)
        ckpt.wait()
        restored, restored_meta = ckpt.restore(target=state)
    _assert_trees_identical(restored, state)
    assert isinstance(restored["train"], train_state.TrainState)
    assert restored["train"].apply_fn is state["train"].apply_fn
    assert restored_meta == {"epoch": 1, "index": 17, "config": {"lr": 1e-3, "name": "sft"},
                             "metrics_rows": 42, "history": [1.5, 2.0]}
    # The restored state keeps training exactly like the original.
    step = jax.jit(lambda s: s.apply_gradients(grads=jax.tree.map(jnp.ones_like, s.params)))
    _assert_trees_identical(step(restored["train"]), step(state["train"]))
    # Keys drawn from the restored keys match.
    np.testing.assert_array_equal(jax.random.normal(restored["rng"], (4,)),
                                  jax.random.normal(state["rng"], (4,)))


def test_restore_from_abstract_target_and_without_target(tmp_path):
    state = _full_state()
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, state, {"epoch": 0})
    abstract = jax.eval_shape(lambda: state)
    restored, _ = ckpt.restore(1, target=abstract)
    _assert_trees_identical(restored, state)
    # Typed and raw keys are interchangeable through the target.
    swapped = dict(state, rng=jax.random.key_data(state["rng"]),
                   raw_rng=jax.random.wrap_key_data(state["raw_rng"]))
    restored, _ = ckpt.restore(1, target=swapped)
    _assert_trees_identical(restored, swapped)
    # No target: nested dicts, typed keys re-wrapped from the recorded layout.
    plain, meta = restore_checkpoint(tmp_path)
    assert meta == {"epoch": 0}
    assert jax.dtypes.issubdtype(plain["rng"].dtype, jax.dtypes.prng_key)
    assert str(jax.random.key_impl(plain["rbg_rng"])) == "rbg"
    np.testing.assert_array_equal(plain["raw_rng"], state["raw_rng"])
    np.testing.assert_array_equal(plain["train"]["params"]["params"]["Dense_0"]["kernel"],
                                  state["train"].params["params"]["Dense_0"]["kernel"])
    ckpt.close()


def test_interval_keep_limit_and_latest(tmp_path):
    state = {"w": jnp.arange(4.0)}
    ckpt = Checkpointer(tmp_path, save_interval_steps=3, max_to_keep=2)
    written = [step for step in range(1, 11) if ckpt.save(step, {"w": state["w"] + step}, {"step": step})]
    assert written == [3, 6, 9]
    assert ckpt.save(10, {"w": state["w"] + 10}, {"step": 10}, force=True)
    assert not ckpt.save(10, state, {}, force=True)  # already saved: a no-op
    ckpt.wait()
    assert ckpt.all_steps() == [9, 10]
    assert ckpt.latest_step() == 10
    assert sorted(os.listdir(tmp_path)) == ["10", "9"]
    restored, meta = ckpt.restore(target=state)
    np.testing.assert_array_equal(restored["w"], state["w"] + 10)
    assert meta == {"step": 10}
    restored, meta = ckpt.restore(9, target=state)
    np.testing.assert_array_equal(restored["w"], state["w"] + 9)
    ckpt.close()
    # A fresh checkpointer on the same directory sees the same steps.
    assert Checkpointer(tmp_path, save_interval_steps=3).latest_step() == 10


def test_interval_zero_saves_only_forced_steps(tmp_path):
    ckpt = Checkpointer(tmp_path, save_interval_steps=0, async_save=False)
    assert not any(ckpt.save(step, {"x": jnp.ones(2)}) for step in range(1, 5))
    assert ckpt.save(4, {"x": jnp.ones(2)}, force=True)
    assert ckpt.all_steps() == [4]


def test_restore_onto_other_shardings(tmp_path):
    devices = np.array(jax.devices())
    assert devices.size >= 8, "conftest sets 8 fake CPU devices"
    mesh4 = Mesh(devices[:4].reshape(4), ("data",))
    values = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    saved = {"w": jax.device_put(values, NamedSharding(mesh4, P("data"))),
             "b": jax.device_put(values[0], NamedSharding(mesh4, P()))}
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, saved, {})

    mesh8 = Mesh(devices[:8].reshape(4, 2), ("data", "model"))
    target = {"w": jax.ShapeDtypeStruct((8, 6), jnp.float32, sharding=NamedSharding(mesh8, P("data", "model"))),
              "b": jax.ShapeDtypeStruct((6,), jnp.float32, sharding=NamedSharding(mesh8, P("model")))}
    restored, _ = ckpt.restore(target=target)
    np.testing.assert_array_equal(restored["w"], values)
    np.testing.assert_array_equal(restored["b"], values[0])
    assert restored["w"].sharding == target["w"].sharding
    assert restored["b"].sharding == target["b"].sharding
    assert restored["w"].addressable_shards[0].data.shape == (2, 3)

    # One sharding for every leaf: a single device.
    single = jax.sharding.SingleDeviceSharding(devices[5])
    restored, _ = ckpt.restore(target=saved, shardings=single)
    for name in ("w", "b"):
        np.testing.assert_array_equal(restored[name], np.asarray(saved[name]))
        assert restored[name].sharding == single
    # A pytree of shardings.
    per_leaf = {"w": NamedSharding(mesh8, P(("data", "model"))), "b": single}
    restored, _ = ckpt.restore(target=saved, shardings=per_leaf)
    assert restored["w"].sharding == per_leaf["w"] and restored["b"].sharding == single
    np.testing.assert_array_equal(restored["w"], values)


def test_unfinished_save_is_never_latest(tmp_path):
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(2, {"x": jnp.arange(3)}, {"at": 2})
    ckpt.close()
    # A run killed mid-save leaves orbax's temporary directory behind.
    leftover = tmp_path / "5.orbax-checkpoint-tmp-1700000000123"
    (leftover / "state").mkdir(parents=True)
    (leftover / "state" / "partial").write_bytes(b"\x00" * 10)
    reopened = Checkpointer(tmp_path, async_save=False)
    assert reopened.latest_step() == 2
    restored, meta = reopened.restore(target={"x": jnp.zeros(3, jnp.int32)})
    assert meta == {"at": 2}
    np.testing.assert_array_equal(restored["x"], np.arange(3))
    assert not leftover.exists()  # cleaned up when a writer reopens the directory
    assert reopened.save(5, {"x": jnp.arange(3) + 5}, {"at": 5})
    assert reopened.latest_step() == 5
    # Read-only access ignores a leftover too.
    (tmp_path / "9.orbax-checkpoint-tmp-1700000000999").mkdir()
    assert restore_checkpoint(tmp_path, target={"x": jnp.zeros(3, jnp.int32)})[1] == {"at": 5}


def test_clear_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        restore_checkpoint(missing)
    assert not missing.exists()
    empty = Checkpointer(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no finished checkpoint in .*empty"):
        empty.restore()

    ckpt = Checkpointer(tmp_path / "c", async_save=False)
    ckpt.save(1, {"params": {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}}, {})
    with pytest.raises(FileNotFoundError, match=r"step 4 .*available steps: \[1\]"):
        ckpt.restore(4)
    with pytest.raises(ValueError, match=r"params\.bias.*params\.b\b"):
        ckpt.restore(target={"params": {"w": jnp.ones((2, 3)), "bias": jnp.zeros(3)}})
    with pytest.raises(ValueError, match=r"`params\.w` has shape \(2, 3\).*\(3, 2\)"):
        ckpt.restore(target={"params": {"w": jnp.ones((3, 2)), "b": jnp.zeros(3)}})
    with pytest.raises(ValueError, match=r"`params\.b` has dtype float32.*int32"):
        ckpt.restore(target={"params": {"w": jnp.ones((2, 3)), "b": jnp.zeros(3, jnp.int32)}})
    with pytest.raises(TypeError, match=r"meta\.bad"):
        ckpt.save(2, {"x": jnp.ones(1)}, {"bad": object()}, force=True)
    with pytest.raises(ValueError, match="save_interval_steps"):
        Checkpointer(tmp_path / "d", save_interval_steps=-1)
