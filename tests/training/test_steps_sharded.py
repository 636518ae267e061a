"""The step functions on the 8 fake CPU devices of conftest.py equal the 1-device steps.

Data parallel (batch over "data" = 8), data x FSDP (2 x 4, parameters, optimizer state and
reference parameters split over "fsdp"), and `jax.shard_map` with an `axis_name`: parameters
after two steps agree with the single-device run within 1e-5."""
import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rlhf_jax.training.preference_step import PreferenceLossConfig, preference_step
from rlhf_jax.training.reward_step import reward_step
from rlhf_jax.training.sft_step import sft_step
from rlhf_jax.training.sharding import MeshConfig, make_mesh, param_shardings, shard_batch, shard_params
from rlhf_jax.training.state import train_state_shardings
from rlhf_jax.training.step_runner import make_train_step
from step_problems import (
    POLICY,
    POLICY_PARAMS,
    REFERENCE_PARAMS,
    REWARD_MODEL,
    REWARD_PARAMS,
    assert_trees_close,
    fresh_state,
    preference_batch,
    sft_batch,
)

STEPS = 2
SIGMOID = PreferenceLossConfig(loss_type="sigmoid", beta=0.5)
SFT_BATCHES = [sft_batch(seed) for seed in (21, 22)]
PAIR_BATCHES = [preference_batch(seed) for seed in (23, 24)]
# name -> (step, module, params, batches, static options, uses the reference)
PROBLEMS = {
    "sft": (sft_step, POLICY, POLICY_PARAMS, SFT_BATCHES, {}, False),
    "dpo": (preference_step, POLICY, POLICY_PARAMS, PAIR_BATCHES, {"config": SIGMOID}, True),
    "reward": (reward_step, REWARD_MODEL, REWARD_PARAMS, PAIR_BATCHES, {"center_coef": 0.01}, False),
}


def run(name, run_step, state, place_batch=lambda batch: batch, ref_params=None):
    _, _, _, batches, _, uses_reference = PROBLEMS[name]
    losses = []
    for batch in batches[:STEPS]:
        args = (ref_params,) if uses_reference else ()
        state, metrics = run_step(state, place_batch(batch), *args)
        losses.append(float(next(value for key, value in metrics.items() if key.endswith("/loss"))))
    return state, losses


@functools.lru_cache(maxsize=None)
def single_device(name):
    step, module, params, _, options, uses_reference = PROBLEMS[name]
    state, losses = run(name, make_train_step(step, **options), fresh_state(module, params),
                        ref_params=REFERENCE_PARAMS if uses_reference else None)
    return jax.device_get(state.params), losses


@pytest.mark.parametrize("name, mesh_config", [
    ("sft", MeshConfig(data=8)),
    ("dpo", MeshConfig(data=2, fsdp=4)),
    ("reward", MeshConfig(data=2, fsdp=4)),
])
def test_jit_on_a_mesh_equals_one_device(name, mesh_config):
    step, module, params, _, options, uses_reference = PROBLEMS[name]
    mesh = make_mesh(mesh_config)
    shardings = param_shardings(params, mesh, min_size=256)
    state = fresh_state(module, params)
    state_shardings = train_state_shardings(state, shardings)
    state = shard_params(state, state_shardings)
    ref_params = shard_params(REFERENCE_PARAMS, shardings) if uses_reference else None
    if mesh_config.fsdp > 1:
        specs = [leaf.sharding.spec for leaf in jax.tree.leaves(state.params)]
        assert any("fsdp" in spec for spec in specs)  # the test exercises real FSDP
    run_step = make_train_step(step, mesh=mesh, state_shardings=state_shardings,
                               reference_shardings=shardings, **options)
    state, losses = run(name, run_step, state, lambda batch: shard_batch(batch, mesh), ref_params)
    expected_params, expected_losses = single_device(name)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    assert_trees_close(state.params, expected_params, atol=1e-5)
    assert jax.tree.leaves(state.params)[0].sharding.mesh == mesh


@pytest.mark.parametrize("name", ["sft", "dpo"])
def test_shard_map_with_axis_name_equals_one_device(name):
    """SFT rows differ in response tokens per shard: the global token mean must stay exact."""
    step, module, params, _, options, uses_reference = PROBLEMS[name]
    mesh = make_mesh(MeshConfig(data=8))

    def mapped(state, batch, ref_params):
        extra = {"ref_params": ref_params} if uses_reference else {}
        return step(state, batch, axis_name="data", **extra, **options)

    sharded = jax.jit(jax.shard_map(mapped, mesh=mesh, in_specs=(P(), P("data"), P()), out_specs=(P(), P())),
                      donate_argnums=0)
    run_step = lambda state, batch, *ref: sharded(state, batch, ref[0] if ref else None)
    state, losses = run(name, run_step, fresh_state(module, params),
                        ref_params=REFERENCE_PARAMS if uses_reference else None)
    expected_params, expected_losses = single_device(name)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    assert_trees_close(state.params, expected_params, atol=1e-5)
