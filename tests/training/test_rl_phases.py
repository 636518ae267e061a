"""Generate / update phases with host scores between them equal the one-jit iterations."""
import jax
import numpy as np
import optax

from rlhf_jax.training.grpo import (GRPO_STATIC_ARGNAMES, GRPO_TRAIN_STATIC_ARGNAMES, GRPOConfig,
                                    grpo_generate, grpo_iteration, grpo_train)
from rlhf_jax.training.ppo import (PPO_STATIC_ARGNAMES, PPO_TRAIN_STATIC_ARGNAMES, PPOConfig,
                                   kl_controller, ppo_generate, ppo_iteration, ppo_train,
                                   value_params_from_reward_model)
from rlhf_jax.training.rollout import SamplingConfig
from rlhf_jax.training.state import create_train_state, reference_params
from rl_problems import (EOS, PAD, POLICY_PARAMS, REWARD, TARGET, VALUE, fresh_policy_state,
                         init_params, left_padded_prompts, target_fraction)

SAMPLING = SamplingConfig(max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD)


def numpy_target_fraction(data):
    """The score of `target_fraction`, computed on the host from the phase's output: `[B, N]`."""
    response = np.asarray(data.response_ids)
    mask = np.asarray(data.response_mask)
    return ((response == TARGET) * mask).sum(-1).astype(np.float32) / np.maximum(mask.sum(-1), 1)


def assert_trees_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=2e-6)


def test_grpo_phases_with_host_scores_equal_grpo_iteration():
    config = GRPOConfig(sampling=SAMPLING, group_size=4, kl_coef=0.01, num_minibatches=2)
    prompts = left_padded_prompts(3, 4, 4)
    ref = reference_params(POLICY_PARAMS)
    key = jax.random.key(7)
    one_jit = jax.jit(grpo_iteration, static_argnames=GRPO_STATIC_ARGNAMES)
    state_a, metrics_a = one_jit(fresh_policy_state(optax.adam(1e-2)), ref, *prompts, key,
                                 config=config, score_fn=target_fraction)

    generate = jax.jit(grpo_generate, static_argnames=GRPO_STATIC_ARGNAMES)
    train = jax.jit(grpo_train, static_argnames=GRPO_TRAIN_STATIC_ARGNAMES)
    sample_key, shuffle_key = jax.random.split(key)
    state = fresh_policy_state(optax.adam(1e-2))
    data = generate(state, ref, *prompts, sample_key, config=config)
    assert data.scores is None and data.response_ids.shape[:2] == (4, 4)
    # Host scores as [n, G] or flattened [n * G] (response g of prompt i at i * G + g).
    state_b, metrics_b = train(state, data, numpy_target_fraction(data), shuffle_key, config=config)
    state_c, metrics_c = train(fresh_policy_state(optax.adam(1e-2)), data,
                               numpy_target_fraction(data).reshape(-1), shuffle_key, config=config)
    assert_trees_close(state_b.params, state_c.params)
    assert_trees_close(metrics_b, metrics_c)
    assert_trees_close(state_a.params, state_b.params)
    assert_trees_close(metrics_a, metrics_b)


def test_ppo_phases_with_host_scores_equal_ppo_iteration():
    config = PPOConfig(sampling=SAMPLING, kl_coef=0.01, epochs=2, num_minibatches=2)
    prompts = left_padded_prompts(4, 8, 4)
    ref = reference_params(POLICY_PARAMS)
    value_params = value_params_from_reward_model(init_params(REWARD, 1))
    key = jax.random.key(8)

    def states():
        return (fresh_policy_state(optax.adam(1e-2)),
                create_train_state(VALUE, jax.tree.map(np.array, value_params), optax.adam(1e-2)))

    kl_state = kl_controller(config).init()
    one_jit = jax.jit(ppo_iteration, static_argnames=PPO_STATIC_ARGNAMES)
    out_a = one_jit(*states(), kl_state, ref, *prompts, key, config=config, score_fn=target_fraction)

    generate = jax.jit(ppo_generate, static_argnames=PPO_STATIC_ARGNAMES)
    train = jax.jit(ppo_train, static_argnames=PPO_TRAIN_STATIC_ARGNAMES)
    sample_key, shuffle_key = jax.random.split(key)
    policy, value = states()
    data = generate(policy, value, ref, *prompts, sample_key, config=config)
    assert data.scores is None and data.values is not None
    out_b = train(policy, value, kl_state, data, numpy_target_fraction(data), shuffle_key, config=config)
    assert_trees_close(out_a, out_b)


def test_ppo_without_a_reference_is_ppo_with_a_zero_kl_coefficient():
    """`kl_coef` 0 never reads the reference, so PPO runs without one (`ref_params=None`): the
    same update as with a reference at coefficient 0, and no `objective/kl` is logged."""
    import dataclasses
    config = PPOConfig(sampling=SAMPLING, kl_coef=0.0, epochs=1, num_minibatches=2)
    prompts = left_padded_prompts(5, 8, 4)
    value_params = value_params_from_reward_model(init_params(REWARD, 1))
    policy = fresh_policy_state(optax.adam(1e-2))
    value = create_train_state(VALUE, jax.tree.map(np.array, value_params), optax.adam(1e-2))
    generate = jax.jit(ppo_generate, static_argnames=PPO_STATIC_ARGNAMES)
    train = jax.jit(ppo_train, static_argnames=PPO_TRAIN_STATIC_ARGNAMES)
    data = generate(policy, value, None, *prompts, jax.random.key(3), config=config)
    assert data.ref_logp is None
    scores = numpy_target_fraction(data)
    kl_state = kl_controller(config).init()
    with_ref = train(policy, value, kl_state, dataclasses.replace(data, ref_logp=data.logp - 0.5), scores,
                     jax.random.key(4), config=config)
    without = train(policy, value, kl_state, data, scores, jax.random.key(4), config=config)
    assert "objective/kl" in with_ref[3] and "objective/kl" not in without[3]
    assert_trees_close(without[:3], with_ref[:3])
    assert_trees_close(without[3], {k: v for k, v in with_ref[3].items() if k != "objective/kl"})
