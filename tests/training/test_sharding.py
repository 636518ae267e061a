"""Mesh, shardings and multi-process start-up on the 8 fake CPU devices of conftest.py.

The central check: one pure training step, jitted on one device, on a data-parallel mesh, on
an FSDP mesh, and written with `shard_map` + `lax.pmean`, gives the same parameters."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax.training import distributed
from rlhf_jax.training.distributed import DistributedConfig, initialize_distributed
from rlhf_jax.training.optim import OptimizerConfig, make_optimizer
from rlhf_jax.training.sharding import (
    MeshConfig,
    batch_sharding,
    cross_replica_mean,
    make_mesh,
    mesh_shape,
    opt_state_shardings,
    param_shardings,
    replicated,
    shard_batch,
    shard_params,
)
from rlhf_jax.training.state import create_train_state, train_state_shardings

BATCH, FEATURES, STEPS = 32, 16, 3


def test_eight_fake_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize(
    "config, shape",
    [(MeshConfig(), (8, 1, 1)), (MeshConfig(data=2, fsdp=-1), (2, 4, 1)),
     (MeshConfig(data=2, fsdp=2, tensor=2), (2, 2, 2)), (MeshConfig(data=1, fsdp=8), (1, 8, 1)),
     (MeshConfig(data=-1, tensor=4), (2, 1, 4))],
)
def test_make_mesh_shapes(config, shape):
    mesh = make_mesh(config)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == shape
    assert mesh.devices.size == 8


def test_make_mesh_on_a_device_subset():
    mesh = make_mesh(MeshConfig(data=-1, fsdp=2), devices=jax.devices()[:4])
    assert tuple(mesh.shape.values()) == (2, 2, 1)
    assert set(mesh.devices.flat) == set(jax.devices()[:4])


@pytest.mark.parametrize(
    "config, message",
    [(MeshConfig(data=3), "does not match the 8"), (MeshConfig(data=4, fsdp=4), "does not match the 8"),
     (MeshConfig(data=-1, fsdp=-1), "at most one"), (MeshConfig(data=3, fsdp=-1), "not divisible"),
     (MeshConfig(fsdp=0), "positive size"), (MeshConfig(tensor=-2), "positive size")],
)
def test_make_mesh_errors(config, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(config)
    with pytest.raises(ValueError, match=message):
        mesh_shape(config, 8)



def adam_state(opt_state):
    """The ScaleByAdamState (mu, nu) inside an optimizer state, wherever the chain put it."""
    is_adam = lambda node: isinstance(node, optax.ScaleByAdamState)
    (found,) = [node for node in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(node)]
    return found

class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):  # [B, F] -> [B]
        x = nn.tanh(nn.Dense(64)(x))
        x = nn.LayerNorm()(x)
        x = nn.tanh(nn.Dense(32)(x))
        return nn.Dense(1)(x)[:, 0]


def regression_data(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH, FEATURES)).astype(np.float32)
    y = np.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2]
    return {"x": x, "y": y.astype(np.float32)}


def train_step(state, batch, *, axis_name=None):
    """One pure regression step; `axis_name` set = inside shard_map/pmap over that axis."""

    def loss_fn(params):
        pred = state.apply_fn(params, batch["x"])
        return jnp.mean((pred - batch["y"]) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    grads, loss = cross_replica_mean((grads, loss), axis_name)
    return state.apply_gradients(grads=grads), {"loss": loss}


MODULE = MLP()
PARAMS = MODULE.init(jax.random.key(0), jnp.zeros((1, FEATURES)))
OPTIMIZER = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=1, total_steps=10,
                                           weight_decay=0.01, max_grad_norm=1.0))
BATCHES = [regression_data(seed) for seed in range(STEPS)]


@functools.lru_cache(maxsize=1)
def single_device_run():
    state = create_train_state(MODULE, PARAMS, OPTIMIZER)
    step = jax.jit(train_step)
    losses = []
    for batch in BATCHES:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return jax.device_get(state.params), losses


def sharded_run(mesh, shardings):
    state = create_train_state(MODULE, PARAMS, OPTIMIZER, param_shardings=shardings)
    state_shardings = train_state_shardings(state, shardings)
    step = jax.jit(train_step, in_shardings=(state_shardings, batch_sharding(mesh)),
                   out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0)
    losses = []
    for batch in BATCHES:
        state, metrics = step(state, shard_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    return state, losses


def assert_params_close(params, reference, atol=1e-5):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=atol, rtol=0), params, reference)


def test_data_parallel_step_equals_single_device():
    mesh = make_mesh(MeshConfig())
    shardings = param_shardings(PARAMS, mesh, fsdp=False)
    state, losses = sharded_run(mesh, shardings)
    reference, reference_losses = single_device_run()
    assert_params_close(state.params, reference)
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    kernel = state.params["params"]["Dense_0"]["kernel"]
    assert kernel.sharding.spec == P() and len(kernel.sharding.device_set) == 8


def test_fsdp_step_equals_single_device():
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    shardings = param_shardings(PARAMS, mesh, min_size=512)
    state, losses = sharded_run(mesh, shardings)
    reference, reference_losses = single_device_run()
    assert_params_close(state.params, reference)
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
    kernel = state.params["params"]["Dense_0"]["kernel"]  # [16, 64]: split over fsdp on axis 1
    assert kernel.sharding.spec == P(None, "fsdp")
    assert kernel.addressable_shards[0].data.shape == (16, 16)
    adam_mu = adam_state(state.opt_state).mu["params"]["Dense_1"]["kernel"]  # [64, 32]
    assert adam_mu.sharding.spec == P("fsdp")
    assert state.params["params"]["Dense_2"]["kernel"].sharding.spec == P()


def test_shard_map_step_with_pmean_equals_single_device():
    mesh = make_mesh(MeshConfig())
    state = create_train_state(MODULE, PARAMS, OPTIMIZER)
    state = shard_params(state, replicated(mesh))
    step = jax.jit(jax.shard_map(
        functools.partial(train_step, axis_name="data"), mesh=mesh,
        in_specs=(P(), P("data")), out_specs=(P(), P()),
    ))
    losses = []
    for batch in BATCHES:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    reference, reference_losses = single_device_run()
    assert_params_close(state.params, reference)
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)


def test_param_shardings_fsdp_big_matrices_replicate_small():
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    params = {"embed": jnp.zeros((1000, 64)), "square": jnp.zeros((128, 128)),
              "odd": jnp.zeros((129, 130)), "bias": jnp.zeros((4096,)), "small": jnp.zeros((8, 8))}
    specs = jax.tree.map(lambda s: s.spec, param_shardings(params, mesh, min_size=1024))
    assert specs == {"embed": P("fsdp"), "square": P("fsdp"), "odd": P(), "bias": P("fsdp"),
                     "small": P()}
    specs = jax.tree.map(lambda s: s.spec, param_shardings(params, mesh, fsdp=False))
    assert all(spec == P() for spec in specs.values())
    abstract = jax.eval_shape(lambda: params)
    assert jax.tree.map(lambda s: s.spec, param_shardings(abstract, mesh, min_size=1024))["embed"] == P("fsdp")


def test_param_shardings_rules_override_and_errors():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    params = {"attn": {"wq": jnp.zeros((64, 64)), "wo": jnp.zeros((64, 64))}, "norm": jnp.zeros((64,))}
    rules = [(r"attn/wq$", P("fsdp", "tensor")), (r"attn/wo$", P("tensor", "fsdp"))]
    specs = jax.tree.map(lambda s: s.spec, param_shardings(params, mesh, min_size=16, rules=rules))
    assert specs == {"attn": {"wq": P("fsdp", "tensor"), "wo": P("tensor", "fsdp")}, "norm": P("fsdp")}
    with pytest.raises(ValueError, match="attn/wq.*unknown mesh axis"):
        param_shardings(params, mesh, rules=[("wq", P("model"))])
    with pytest.raises(ValueError, match="not divisible"):
        param_shardings({"w": jnp.zeros((3, 4))}, mesh, rules=[("w", P("tensor"))])
    with pytest.raises(ValueError, match="more entries"):
        param_shardings({"b": jnp.zeros((4,))}, mesh, rules=[("b", P(None, "tensor"))])


def test_opt_state_shardings_follow_params():
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    shardings = param_shardings(PARAMS, mesh, min_size=512)
    optimizer = make_optimizer(OptimizerConfig(schedule="constant"))
    specs = jax.tree.map(lambda s: s.spec, opt_state_shardings(optimizer, PARAMS, shardings, mesh))
    adam = adam_state(specs.inner_state)
    assert adam.mu["params"]["Dense_0"]["kernel"] == P(None, "fsdp")
    assert adam.nu["params"]["Dense_1"]["kernel"] == P("fsdp")
    assert adam.count == P() and specs.total_notfinite == P()


def test_shard_batch_splits_leading_axis():
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    batch = {"tokens": np.arange(16 * 3).reshape(16, 3), "score": np.ones(16, np.float32)}
    sharded = shard_batch(batch, mesh)
    assert sharded["tokens"].sharding == NamedSharding(mesh, P(("data", "fsdp")))
    assert sharded["tokens"].addressable_shards[0].data.shape == (2, 3)
    np.testing.assert_array_equal(sharded["tokens"], batch["tokens"])
    with pytest.raises(ValueError, match=r"\['score'\].*multiple of 8"):
        shard_batch({"score": np.ones(12)}, mesh)
    with pytest.raises(ValueError, match="cannot be split"):
        shard_batch({"scalar": np.float32(1.0)}, mesh)


def test_cross_replica_mean_is_identity_without_axis():
    tree = {"a": jnp.arange(3.0)}
    assert cross_replica_mean(tree, None) is tree


# --- multi-process start-up (the real multi-process run is tested elsewhere) ---------------

@pytest.fixture
def recorded_initialize(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(distributed, "detect_cluster", lambda: None)
    return calls


def test_single_process_does_nothing(recorded_initialize):
    assert initialize_distributed() is False
    assert initialize_distributed(DistributedConfig("localhost:1234", num_processes=1, process_id=0)) is False
    assert recorded_initialize == []


def test_explicit_config_is_passed_to_jax(recorded_initialize):
    config = DistributedConfig("localhost:1234", num_processes=2, process_id=1, local_device_ids=(0, 1))
    assert initialize_distributed(config) is True
    (call,) = recorded_initialize
    assert call["coordinator_address"] == "localhost:1234"
    assert (call["num_processes"], call["process_id"], call["local_device_ids"]) == (2, 1, [0, 1])


def test_detected_cluster_fills_missing_values(recorded_initialize, monkeypatch):
    monkeypatch.setattr(distributed, "detect_cluster", lambda: "slurm")
    assert initialize_distributed(DistributedConfig()) is True
    assert initialize_distributed(DistributedConfig(coordinator_address="node0:5000")) is True
    assert recorded_initialize[0]["num_processes"] is None
    assert recorded_initialize[1]["coordinator_address"] == "node0:5000"


@pytest.mark.parametrize(
    "config, message",
    [(DistributedConfig("h:1", num_processes=2, process_id=2), "smaller than"),
     (DistributedConfig("h:1", num_processes=0, process_id=0), "num_processes"),
     (DistributedConfig("h:1", num_processes=2, process_id=-1), "process_id"),
     (DistributedConfig("localhost", num_processes=2, process_id=0), "host:port"),
     (DistributedConfig(num_processes=2, process_id=0), "not coordinator_address"),
     (DistributedConfig(coordinator_address="h:1"), "not num_processes, process_id"),
     (DistributedConfig("h:1", 2, 0, local_device_ids=(-1,)), "local_device_ids")],
)
def test_inconsistent_config_raises(recorded_initialize, config, message):
    with pytest.raises(ValueError, match=message):
        initialize_distributed(config)
    assert recorded_initialize == []


def test_coordinator_address_from_environment_counts_as_given(recorded_initialize, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "node0:7000")
    assert initialize_distributed(DistributedConfig(num_processes=2, process_id=1)) is True
    assert recorded_initialize[0]["coordinator_address"] == "node0:7000"
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "no-port")
    with pytest.raises(ValueError, match="host:port"):
        initialize_distributed(DistributedConfig(num_processes=2, process_id=1))
