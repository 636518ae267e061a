"""LoRA train states: adapters-only gradients and optimizer state, the reference as the base
with adapters disabled, dropout keys, and sharded steps equal to single-device ones."""
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.lora import LoRAConfig, LoRAModel, init_adapters, merge_adapters
from rlhf_jax.training.preference_step import PreferenceLossConfig, preference_step
from rlhf_jax.training.lora_state import (
    create_lora_train_state,
    disabled_adapters,
    inference_model,
    merged_params,
)
from rlhf_jax.training.logprobs import LMBatch, response_logprobs
from rlhf_jax.training.sft_step import sft_step
from rlhf_jax.training.sharding import MeshConfig, make_mesh, shard_batch
from rlhf_jax.training.step_runner import make_train_step
from step_problems import (
    OPTIMIZER,
    VOCAB,
    POLICY,
    POLICY_PARAMS,
    assert_trees_close,
    fresh_state,
    jitted_step,
    preference_batch,
    sequences,
    sft_batch,
)

CONFIG = LoRAConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj", "down_proj"))
MODEL = LoRAModel(POLICY, CONFIG)
SFT = jitted_step(sft_step)


def copy(tree):
    return jax.tree.map(jnp.array, tree)


def lora_state(config=CONFIG, dropout_key=None, **options):
    adapters = init_adapters(POLICY_PARAMS, config, jax.random.key(4))
    return create_lora_train_state(LoRAModel(POLICY, config), copy(POLICY_PARAMS), {"lora": adapters},
                                   OPTIMIZER, dropout_key=dropout_key, **options)


def nbytes(tree) -> int:
    return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


def test_only_adapters_are_trained_and_hold_optimizer_state():
    state, _ = lora_state()
    full = fresh_state(POLICY, POLICY_PARAMS)
    adapter_shapes = {np.shape(x) for x in jax.tree.leaves(state.params)}
    big = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert big and {np.shape(x) for x in big} <= adapter_shapes
    assert nbytes(state.opt_state) < 0.1 * nbytes(full.opt_state)
    base_before = jax.device_get(state.apply_fn.base)
    for seed in (1, 2):
        state, metrics = SFT(state, sft_batch(seed))
    assert np.isfinite(metrics["sft/loss"])
    # The base is returned unchanged; B moved away from 0.
    assert_trees_close(jax.device_get(state.apply_fn.base), base_before, atol=0)
    b = state.params["lora"]["decoder"]["layers_0"]["attn"]["q_proj"]["lora_b"]
    assert float(jnp.abs(b).max()) > 0


def test_reference_is_the_base_with_adapters_disabled():
    state, _ = lora_state()
    for seed in (1, 2, 3):
        state, _ = SFT(state, sft_batch(seed))
    rng = np.random.default_rng(9)
    batch = LMBatch(prompt_ids=rng.integers(1, VOCAB, (4, 5)).astype(np.int32), prompt_mask=np.ones((4, 5), np.int32),
                    response_ids=rng.integers(1, VOCAB, (4, 1, 6)).astype(np.int32),
                    response_mask=(np.arange(6) < np.array([6, 3, 1, 5])[:, None, None]).astype(np.int32))

    def logprobs(apply_fn, params):
        return response_logprobs(apply_fn, params, batch).logprobs

    ref = logprobs(state.apply_fn, disabled_adapters())
    base = logprobs(POLICY.apply, POLICY_PARAMS)
    np.testing.assert_allclose(ref, base, atol=1e-6)
    policy = logprobs(state.apply_fn, state.params)
    assert np.abs(np.asarray(policy - base)).max() > 1e-4
    # The merged model and the inference view give the policy's log-probs.
    merged = logprobs(POLICY.apply, merged_params(state))
    model, params = inference_model(POLICY, state)
    viewed = logprobs(model.apply, params)
    np.testing.assert_allclose(merged, policy, atol=1e-5)
    np.testing.assert_allclose(viewed, policy, atol=1e-6)


def test_dropout_key_advances_with_every_update():
    config = LoRAConfig(rank=2, alpha=4.0, dropout=0.3, targets=("q_proj", "v_proj"))
    state, _ = lora_state(config, dropout_key=jax.random.PRNGKey(7))
    keys = [np.asarray(state.apply_fn.dropout_key)]
    for seed in (1, 2):
        state, _ = SFT(state, sft_batch(seed))
        keys.append(np.asarray(state.apply_fn.dropout_key))
    assert not np.array_equal(keys[0], keys[1]) and not np.array_equal(keys[1], keys[2])
    # With trained adapters, a forward pass through the state's apply_fn applies dropout.
    input_ids, attention_mask, _ = sequences(3)
    train = state.apply_fn({"params": state.params}, input_ids, attention_mask)
    model, params = inference_model(POLICY, state)
    evaluation = model.apply({"params": params}, input_ids, attention_mask)
    assert np.abs(np.asarray(train - evaluation)).max() > 1e-6


def test_sharded_lora_steps_equal_single_device():
    """data x fsdp = 2 x 4 with every leaf of >= 64 elements split: base, adapters and Adam
    moments sharded; two DPO steps with the reference computed in the step from the base."""
    config = PreferenceLossConfig(loss_type="sigmoid", beta=0.5)
    batches = [preference_batch(seed) for seed in (23, 24)]
    single, _ = lora_state()
    step = jitted_step(preference_step, "config")
    for batch in batches:
        single, single_metrics = step(single, batch, config=config, ref_params=disabled_adapters())

    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    sharded, shardings = lora_state(mesh=mesh, min_size=64)
    q_kernel = sharded.apply_fn.base["decoder"]["layers_0"]["attn"]["q_proj"]["kernel"]
    lora_a = sharded.params["lora"]["decoder"]["layers_0"]["attn"]["q_proj"]["lora_a"]
    assert "fsdp" in tuple(q_kernel.sharding.spec) and "fsdp" in tuple(lora_a.sharding.spec)
    compiled = make_train_step(preference_step, mesh=mesh, state_shardings=shardings, config=config,
                               ref_params=disabled_adapters())
    for batch in batches:
        sharded, metrics = compiled(sharded, shard_batch(batch, mesh))
    assert_trees_close(jax.device_get(sharded.params), jax.device_get(single.params), atol=1e-5)
    np.testing.assert_allclose(metrics["dpo/loss"], single_metrics["dpo/loss"], rtol=1e-5)
    mu = [x for x in jax.tree.leaves(sharded.opt_state) if np.shape(x) == np.shape(lora_a)]
    assert mu and all(x.sharding.spec == lora_a.sharding.spec for x in mu)


def test_merge_matches_the_adapted_forward_with_remat():
    remat_policy = POLICY.clone(config=POLICY.config.replace(remat=True))
    adapters = jax.tree.map(lambda x: x + 0.1, init_adapters(POLICY_PARAMS, CONFIG, jax.random.key(1)))
    input_ids, attention_mask, _ = sequences(5)
    params = {"base": POLICY_PARAMS, "lora": adapters}
    adapted = LoRAModel(remat_policy, CONFIG).apply({"params": params}, input_ids, attention_mask)
    merged = POLICY.apply({"params": merge_adapters(params, CONFIG.scale)}, input_ids, attention_mask)
    np.testing.assert_allclose(adapted, merged, atol=1e-5)
