"""Sampler-trainer consistency: with top-k / top-p sampling the rollout and the update score
tokens under the kept set they were drawn from, and the first minibatch of PPO and GRPO has
importance ratio 1 for every sampling setting.

"Ratio 1" is to float32 rounding (within 2 ulp of 1): the rollout's forward pass and the
update's (inside `lax.scan`, under `value_and_grad`) are different XLA programs, which may
round a log-softmax differently in the last bit. Without the kept-set replay the rollout's
log-probs would be those of the full softmax, off by the filtered mass (> 1e-2 nats here).
The PPO and GRPO batches score more positions than the model's hidden size, so the rollout and
the update both take the blocked LM head (`chunked_head_stats(kept_threshold=)`)."""
import dataclasses

import jax
import numpy as np
import optax
import pytest

from rlhf_jax.training.grpo import (GRPO_STATIC_ARGNAMES, GRPO_TRAIN_STATIC_ARGNAMES, GRPOConfig, grpo_generate,
                                    grpo_train)
from rlhf_jax.training.ppo import (PPO_STATIC_ARGNAMES, PPO_TRAIN_STATIC_ARGNAMES, PPOConfig, kl_controller,
                                   ppo_generate, ppo_train, value_params_from_reward_model)
from rlhf_jax.training.rollout import SamplingConfig, policy_logprobs
from rlhf_jax.training.state import create_train_state
from rl_problems import (CONFIG, EOS, PAD, REF_PARAMS, REWARD, VALUE, fresh_policy_state, init_params,
                         left_padded_prompts, target_fraction)

SETTINGS = {  # name: (top_k, top_p, temperature)
    "top_k": (4, 1.0, 1.0),
    "top_p": (0, 0.7, 1.0),
    "top_k_and_top_p": (6, 0.8, 1.0),
    "top_k_temperature": (5, 1.0, 0.7),
    "top_p_temperature": (0, 0.8, 1.4),
    "temperature_only": (0, 1.0, 1.3),
}
RESPONSE = 6
ULP2 = 2 * float(np.finfo(np.float32).eps)  # two float32 ulps at 1
GENERATE_GRPO = jax.jit(grpo_generate, static_argnames=GRPO_STATIC_ARGNAMES)
TRAIN_GRPO = jax.jit(grpo_train, static_argnames=GRPO_TRAIN_STATIC_ARGNAMES)
GENERATE_PPO = jax.jit(ppo_generate, static_argnames=PPO_STATIC_ARGNAMES)
TRAIN_PPO = jax.jit(ppo_train, static_argnames=PPO_TRAIN_STATIC_ARGNAMES)
REPLAY = jax.jit(policy_logprobs, static_argnums=0)


def sampling(name, **overrides):
    top_k, top_p, temperature = SETTINGS[name]
    return SamplingConfig(max_new_tokens=RESPONSE, temperature=temperature, top_k=top_k, top_p=top_p,
                          eos_token_id=EOS, pad_token_id=PAD, **overrides)


def host_scores(data):
    """`target_fraction` of every response, `[B * N]` (the flattened row order)."""
    return np.asarray(target_fraction(*data.flat_responses()))


@pytest.mark.parametrize("name", list(SETTINGS))
def test_rollout_logprobs_are_those_of_the_sampling_distribution(name):
    """The forward-pass rollout log-probs (replayed kept set) equal the sampler's kept-set
    log-probs; with a filter they differ from the full softmax(logits / T)."""
    config = GRPOConfig(sampling=sampling(name), group_size=4, kl_coef=0.0)
    filtered = SETTINGS[name][0] > 0 or SETTINGS[name][1] < 1
    assert config.sampling.replays_kept_set == filtered
    state = fresh_policy_state(optax.sgd(0.0))
    prompts, key = left_padded_prompts(1, 6, 4), jax.random.key(3)
    forward = GENERATE_GRPO(state, None, *prompts, key, config=config)
    sampler = GENERATE_GRPO(state, None, *prompts, key,
                            config=dataclasses.replace(config, sampling=dataclasses.replace(
                                config.sampling, logprobs_source="generate")))
    np.testing.assert_array_equal(forward.response_ids, sampler.response_ids)
    np.testing.assert_allclose(forward.logp, sampler.logp, atol=1e-5)
    full = REPLAY(state.apply_fn, state.params, forward.batch, temperature=config.sampling.temperature).logprobs
    if filtered:
        assert forward.kept_threshold.shape == forward.response_ids.shape
        assert np.abs(np.asarray(full) - np.asarray(forward.logp)).max() > 1e-2
        off = dataclasses.replace(config, sampling=sampling(name, kept_set_logprobs=False))
        plain = GENERATE_GRPO(state, None, *prompts, key, config=off)
        assert plain.kept_threshold is None
        np.testing.assert_array_equal(plain.response_ids, forward.response_ids)
        np.testing.assert_allclose(plain.logp, full, atol=1e-6)
        for data in (forward, sampler):  # the unfiltered softmax's, for the KL, from either source
            np.testing.assert_allclose(data.full_logp, full, atol=1e-5)
            np.testing.assert_array_equal(data.kl_logp, data.full_logp)
    else:
        assert forward.kept_threshold is None and forward.full_logp is None
        np.testing.assert_array_equal(full, forward.logp)
        np.testing.assert_array_equal(forward.kl_logp, forward.logp)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_grpo_first_minibatch_ratio_is_exactly_one(name):
    config = GRPOConfig(sampling=sampling(name), group_size=4, kl_coef=0.02, num_minibatches=1)
    state = fresh_policy_state(optax.adam(1e-2))
    data = GENERATE_GRPO(state, REF_PARAMS, *left_padded_prompts(2, 6, 4), jax.random.key(4), config=config)
    assert data.response_ids.size > CONFIG.hidden_size  # "auto": the LM head runs in blocks
    _, metrics = TRAIN_GRPO(state, data, host_scores(data), jax.random.key(5), config=config)
    assert abs(float(metrics["grpo/ratio_mean"]) - 1.0) <= ULP2
    assert float(metrics["grpo/clipfrac"]) == 0.0


@pytest.mark.parametrize("name", list(SETTINGS))
def test_ppo_first_minibatch_ratio_is_exactly_one(name):
    config = PPOConfig(sampling=sampling(name), kl_coef=0.05, epochs=1, num_minibatches=1)
    policy = fresh_policy_state(optax.adam(1e-2))
    value = create_train_state(VALUE, value_params_from_reward_model(init_params(REWARD, 1)), optax.adam(1e-2))
    data = GENERATE_PPO(policy, value, REF_PARAMS, *left_padded_prompts(3, 8, 4), jax.random.key(6), config=config)
    assert data.response_ids.shape == (8, 1, RESPONSE)
    assert data.response_ids.size > CONFIG.hidden_size  # "auto": the LM head runs in blocks
    _, _, _, metrics = TRAIN_PPO(policy, value, kl_controller(config).init(), data, host_scores(data),
                                 jax.random.key(7), config=config)
    assert float(metrics["ppo/approx_kl"]) <= 0.5 * ULP2 ** 2  # every token's |log-ratio| <= 2 ulp
    assert abs(float(metrics["ppo/ratio_max"]) - 1.0) <= ULP2
    assert float(metrics["ppo/clipfrac"]) == 0.0


@pytest.mark.parametrize("name", ["top_k_and_top_p", "top_p_temperature"])
def test_kl_to_the_reference_is_zero_at_the_reference_whatever_the_filter(name):
    """The reference is the policy itself: every KL (GRPO's k3 and objective/kl, PPO's shaping
    and objective/kl) is 0, although the ratios use kept-set log-probs (> 1e-2 nats above the
    full softmax's here). Comparing kept-set log-probs with the unfiltered reference would give
    -log(kept mass) > 0 per token."""
    state = fresh_policy_state(optax.adam(1e-2))
    config = GRPOConfig(sampling=sampling(name), group_size=4, kl_coef=0.02, num_minibatches=1)
    data = GENERATE_GRPO(state, state.params, *left_padded_prompts(2, 6, 4), jax.random.key(4), config=config)
    assert np.abs(np.asarray(data.logp) - np.asarray(data.ref_logp)).max() > 1e-2
    _, metrics = TRAIN_GRPO(state, data, host_scores(data), jax.random.key(5), config=config)
    assert abs(float(metrics["grpo/kl"])) < 1e-6 and abs(float(metrics["objective/kl"])) < 1e-5
    config = PPOConfig(sampling=sampling(name), kl_coef=0.05, epochs=1, num_minibatches=1)
    value = create_train_state(VALUE, value_params_from_reward_model(init_params(REWARD, 1)), optax.adam(1e-2))
    data = GENERATE_PPO(state, value, state.params, *left_padded_prompts(3, 8, 4), jax.random.key(6), config=config)
    scores = host_scores(data)
    *_, metrics = TRAIN_PPO(state, value, kl_controller(config).init(), data, scores, jax.random.key(7), config=config)
    assert abs(float(metrics["objective/kl"])) < 1e-5
    # the shaped return is the score alone: no KL penalty at the reference
    np.testing.assert_allclose(float(metrics["objective/rlhf_reward"]), float(np.mean(scores)), atol=1e-5)


def test_bad_kept_set_options_raise():
    with pytest.raises(ValueError, match="kept_set_logprobs"):
        SamplingConfig(kept_set_logprobs="yes")
    assert SamplingConfig(top_k=5, greedy=True).replays_kept_set is False
    assert SamplingConfig(top_p=0.9, kept_set_logprobs=False).replays_kept_set is False
