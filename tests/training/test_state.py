"""Train state creation, sharded creation, and the frozen reference parameters."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state as flax_train_state
from jax.sharding import PartitionSpec as P

from rlhf_jax.training.optim import OptimizerConfig, make_optimizer
from rlhf_jax.training.sharding import MeshConfig, make_mesh, param_shardings
from rlhf_jax.training.state import (
    TrainState,
    create_train_state,
    reference_params,
    train_state_shardings,
)



def adam_state(opt_state):
    """The ScaleByAdamState (mu, nu) inside an optimizer state, wherever the chain put it."""
    is_adam = lambda node: isinstance(node, optax.ScaleByAdamState)
    (found,) = [node for node in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(node)]
    return found

class TinyModel(nn.Module):
    @nn.compact
    def __call__(self, x):  # [B, 8] -> [B, 4]
        hidden = nn.relu(nn.Dense(32)(x))  # Dense_0, kernel [8, 32]
        return nn.Dense(4)(hidden)  # Dense_1, kernel [32, 4]


MODULE = TinyModel()
PARAMS = MODULE.init(jax.random.key(0), jnp.zeros((1, 8)))
CONFIG = OptimizerConfig(learning_rate=0.1, schedule="constant", eps=1e-8, max_grad_norm=None)


def test_create_train_state_is_flax_train_state():
    optimizer = make_optimizer(CONFIG)
    state = create_train_state(MODULE, PARAMS, optimizer)
    assert isinstance(state, TrainState) and isinstance(state, flax_train_state.TrainState)
    assert int(state.step) == 0
    x = jnp.ones((2, 8))
    np.testing.assert_array_equal(state.apply_fn(state.params, x), MODULE.apply(PARAMS, x))
    # an apply function works as well as a module
    same = create_train_state(MODULE.apply, PARAMS, optimizer)
    np.testing.assert_array_equal(same.apply_fn(same.params, x), MODULE.apply(PARAMS, x))
    with pytest.raises(ValueError, match="module"):
        create_train_state("not a model", PARAMS, optimizer)


def test_apply_gradients_runs_the_optimizer():
    state = create_train_state(MODULE, PARAMS, make_optimizer(CONFIG))
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    new_state = jax.jit(lambda s, g: s.apply_gradients(grads=g))(state, grads)
    assert int(new_state.step) == 1
    # first Adam step with gradient 1: update = -lr * 1 / (1 + eps) (float32 bias corrections)
    expected = jax.tree.map(lambda p: p - 0.1 / (1.0 + 1e-8), PARAMS)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=2e-6), new_state.params, expected)


def test_reference_params_are_separate_frozen_buffers():
    params = jax.tree.map(jnp.array, PARAMS)  # own buffers: the state holds them and is donated
    state = create_train_state(MODULE, params, make_optimizer(CONFIG))
    ref = reference_params(state.params)
    jax.tree.map(np.testing.assert_array_equal, ref, state.params)
    ref_leaves, policy_leaves = jax.tree.leaves(ref), jax.tree.leaves(state.params)
    assert all(a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer() for a, b in zip(ref_leaves, policy_leaves))
    step = jax.jit(lambda s, g: s.apply_gradients(grads=g), donate_argnums=0)
    state = step(state, jax.tree.map(jnp.ones_like, PARAMS))
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(params))  # donated with the state
    jax.tree.map(np.testing.assert_array_equal, ref, PARAMS)  # untouched by training and donation


def test_sharded_creation_places_params_and_optimizer_state():
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    shardings = param_shardings(PARAMS, mesh, min_size=128)
    optimizer = make_optimizer(OptimizerConfig(schedule="constant"))
    state = create_train_state(MODULE, PARAMS, optimizer, param_shardings=shardings)
    kernel = state.params["params"]["Dense_0"]["kernel"]  # [8, 32]
    assert kernel.sharding.spec == P(None, "fsdp") and kernel.addressable_shards[0].data.shape == (8, 8)
    first_moment = adam_state(state.opt_state).mu["params"]["Dense_0"]["kernel"]
    assert first_moment.sharding.spec == P(None, "fsdp")
    assert state.step.sharding.spec == P() and state.params["params"]["Dense_1"]["bias"].sharding.spec == P()
    jax.tree.map(np.testing.assert_array_equal, state.params, PARAMS)
    # the same state built unsharded has equal values
    plain = create_train_state(MODULE, PARAMS, optimizer)
    jax.tree.map(np.testing.assert_array_equal, state.opt_state, plain.opt_state)


def test_train_state_shardings_on_abstract_state():
    mesh = make_mesh(MeshConfig(data=1, fsdp=8))
    shardings = param_shardings(PARAMS, mesh, min_size=128)
    optimizer = make_optimizer(CONFIG)
    abstract = jax.eval_shape(lambda p: create_train_state(MODULE, p, optimizer), PARAMS)
    specs = jax.tree.map(lambda s: s.spec, train_state_shardings(abstract, shardings))
    assert specs.params["params"]["Dense_0"]["kernel"] == P(None, "fsdp")
    adam = adam_state(specs.opt_state)
    assert adam.mu["params"]["Dense_0"]["kernel"] == P(None, "fsdp") and adam.count == P()
    assert specs.step == P()
    with pytest.raises(ValueError, match="one mesh"):
        other = make_mesh(MeshConfig(), devices=jax.devices()[:4])
        mixed = jax.tree.map(lambda s: s, shardings)
        mixed["params"]["Dense_1"]["bias"] = jax.sharding.NamedSharding(other, P())
        train_state_shardings(abstract, mixed)


def test_skip_policy_inside_train_state_keeps_params():
    state = create_train_state(MODULE, PARAMS, make_optimizer(CONFIG))
    nan_grads = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), PARAMS)
    new_state = jax.jit(lambda s, g: s.apply_gradients(grads=g))(state, nan_grads)
    jax.tree.map(np.testing.assert_array_equal, new_state.params, PARAMS)
    assert int(new_state.step) == 1  # the step counter still counts the attempt
    assert isinstance(new_state.opt_state, optax.ApplyIfFiniteState)
