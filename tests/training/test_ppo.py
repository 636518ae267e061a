"""PPO: learning on a tiny verifiable task, compile-once, and a hand-assembled gradient oracle."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.training.ppo import (PPO_STATIC_ARGNAMES, PPOConfig, kl_controller, ppo_iteration,
                                   ppo_update, value_params_from_reward_model)
from rlhf_jax.training.rollout import Rollout, SamplingConfig
from rlhf_jax.training.state import create_train_state, reference_params
from rl_problems import (EOS, PAD, POLICY_PARAMS, REWARD, VALUE, fresh_policy_state, init_params,
                         left_padded_prompts, response_logp_and_entropy, target_fraction,
                         with_random_responses, with_score_head)

PROMPT, RESPONSE, BATCH = 4, 6, 32
REWARD_PARAMS = init_params(REWARD, 1)


def make_prompts(seed, batch=BATCH):
    return left_padded_prompts(seed, batch, PROMPT)


def fresh_states(optimizer):
    value = create_train_state(VALUE, value_params_from_reward_model(REWARD_PARAMS), optimizer)
    return fresh_policy_state(optimizer), value


@pytest.fixture(scope="module")
def training_run():
    """25 PPO iterations (fixed KL coef, 4 epochs x 2 minibatches); per-iteration metrics and
    the number of times `ppo_iteration` was traced."""
    config = PPOConfig(sampling=SamplingConfig(max_new_tokens=RESPONSE, eos_token_id=EOS, pad_token_id=PAD),
                       kl_coef=0.01, num_minibatches=2)
    traces = []

    def counted_iteration(*args, **kwargs):
        traces.append(1)
        return ppo_iteration(*args, **kwargs)

    step = jax.jit(counted_iteration, static_argnames=PPO_STATIC_ARGNAMES,
                   donate_argnames=("policy_state", "value_state"))
    policy_state, value_state = fresh_states(optax.adam(3e-3, eps=1e-5))
    ref_params = reference_params(POLICY_PARAMS)
    kl_state = kl_controller(config).init()
    rng = jax.random.key(0)
    history = []
    for iteration in range(25):
        prompt_ids, prompt_mask = make_prompts(iteration)
        rng, key = jax.random.split(rng)
        policy_state, value_state, kl_state, metrics = step(
            policy_state, value_state, kl_state, ref_params, prompt_ids, prompt_mask, key,
            config=config, score_fn=target_fraction)
        history.append(jax.tree.map(float, metrics))
    return history, len(traces)


def test_ppo_raises_mean_reward(training_run):
    history, _ = training_run
    scores = np.array([m["objective/scores"] for m in history])
    assert scores[:3].mean() < 0.15
    assert scores[-5:].mean() > scores[:3].mean() + 0.3, scores
    assert history[-1]["objective/kl"] > history[0]["objective/kl"]


def test_ppo_metrics_are_finite_and_named(training_run):
    history, _ = training_run
    expected = {"ppo/clipfrac", "ppo/approx_kl", "ppo/policy_loss", "ppo/entropy", "value/clipfrac",
                "value/loss", "objective/kl", "objective/scores", "objective/rlhf_reward",
                "objective/kl_coef", "rollout/response_length", "rollout/eos_rate",
                "optim/policy_grad_norm", "optim/value_grad_norm"}
    assert expected <= set(history[0])
    assert all(np.isfinite(v) for m in history for v in m.values())
    assert all(m["objective/kl_coef"] == pytest.approx(0.01) for m in history)
    assert 0 <= history[0]["ppo/clipfrac"] <= 1


def test_ppo_iteration_compiles_once(training_run):
    _, traces = training_run
    assert traces == 1


# --- the update alone: compile once, and a hand-assembled oracle ---------------------------

ORACLE_CONFIG = PPOConfig(sampling=SamplingConfig(max_new_tokens=RESPONSE, temperature=0.8,
                                                  eos_token_id=EOS, pad_token_id=PAD),
                          epochs=1, num_minibatches=1, vf_coef=0.3, ent_coef=0.05)
UPDATE_BATCH, LEARNING_RATE = 8, 0.1
SGD = optax.sgd(LEARNING_RATE)  # one object: the optimizer is a static part of the state
_UPDATE_TRACES = []


def _counted_update(*args, **kwargs):
    _UPDATE_TRACES.append(1)
    return ppo_update(*args, **kwargs)


JITTED_UPDATE = jax.jit(_counted_update, static_argnames=("config",),
                        donate_argnames=("policy_state", "value_state"))


@jax.jit
def full_values(params, input_ids, attention_mask):
    return VALUE.apply({"params": params}, input_ids, attention_mask)[:, PROMPT - 1:-1]


def synthetic_rollout(seed, policy_params, value_params):
    """Random responses with right padding; old log-probs/values equal to the current ones
    (ratio 1, no clipping active on the first step)."""
    rng = np.random.default_rng(seed)
    input_ids, attention_mask, response_mask = with_random_responses(
        rng, *make_prompts(seed, UPDATE_BATCH), RESPONSE)
    logp, _ = response_logp_and_entropy(policy_params, input_ids, attention_mask, PROMPT, 0.8)
    values = full_values(value_params, input_ids, attention_mask)
    mask = response_mask.astype(np.float32)
    one = lambda x: np.asarray(x)[:, None]  # [B, ...] -> [B, N = 1, ...]
    return Rollout(
        prompt_ids=input_ids[:, :PROMPT], prompt_mask=attention_mask[:, :PROMPT],
        response_ids=one(input_ids[:, PROMPT:]), response_mask=one(response_mask),
        has_eos=np.zeros((UPDATE_BATCH, 1), bool), logp=one(np.asarray(logp) * mask),
        ref_logp=one(np.asarray(logp) * mask), values=one(np.asarray(values) * mask),
        scores=rng.normal(size=(UPDATE_BATCH, 1)).astype(np.float32),
        advantages=one((rng.normal(size=(UPDATE_BATCH, RESPONSE)) * mask).astype(np.float32)),
        returns=one((rng.normal(size=(UPDATE_BATCH, RESPONSE)) * mask).astype(np.float32)),
    )


def oracle_losses(policy_params, value_params, data, config):
    """Hand-assembled: token-mean of -A * ratio - ent_coef * H, and vf_coef * 0.5 (V - R)^2."""
    input_ids, attention_mask = data.batch.joined()  # [B, P + R]: prompt then response
    single = lambda x: jnp.asarray(x)[:, 0]  # [B, 1, ...] -> [B, ...]
    mask = single(data.response_mask).astype(jnp.float32)
    count = jnp.sum(mask)
    logp, entropy = response_logp_and_entropy(policy_params, input_ids, attention_mask,
                                              PROMPT, config.sampling.temperature)
    ratio = jnp.exp(jnp.where(mask > 0, logp - single(data.logp), 0.0))
    policy_loss = jnp.sum(-single(data.advantages) * ratio * mask) / count
    policy_total = policy_loss - config.ent_coef * jnp.sum(entropy * mask) / count
    values = full_values(value_params, input_ids, attention_mask)
    value_loss = jnp.sum(0.5 * (values - single(data.returns)) ** 2 * mask) / count
    return policy_total, config.vf_coef * value_loss, policy_loss, value_loss


def test_update_matches_hand_assembled_gradient_step():
    value_params = with_score_head(value_params_from_reward_model(REWARD_PARAMS), 5, scale=0.3, bias=0.1)
    data = synthetic_rollout(100, POLICY_PARAMS, value_params)
    def summed(policy_params, value_params):  # the networks share nothing: one gradient each
        policy_total, value_total, policy_loss, value_loss = oracle_losses(
            policy_params, value_params, data, ORACLE_CONFIG)
        return policy_total + value_total, (policy_loss, value_loss)

    (policy_grads, value_grads), (policy_loss, value_loss) = jax.jit(
        jax.grad(summed, argnums=(0, 1), has_aux=True))(POLICY_PARAMS, value_params)

    policy_state = fresh_policy_state(SGD)
    value_state = create_train_state(VALUE, jax.tree.map(jnp.array, value_params), SGD)
    policy_state, value_state, metrics = JITTED_UPDATE(policy_state, value_state, data,
                                                       jax.random.key(0), config=ORACLE_CONFIG)
    expected_policy = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, POLICY_PARAMS, policy_grads)
    expected_value = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, value_params, value_grads)
    for got, want in ((policy_state.params, expected_policy), (value_state.params, expected_value)):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5), got, want)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), policy_state.params, POLICY_PARAMS)
    assert max(jax.tree.leaves(moved)) > 1e-3
    assert float(metrics["ppo/clipfrac"]) == 0.0 and float(metrics["value/clipfrac"]) == 0.0
    assert float(metrics["ppo/policy_loss"]) == pytest.approx(float(policy_loss), abs=1e-6)
    assert float(metrics["value/loss"]) == pytest.approx(float(value_loss), rel=1e-5)


def test_update_compiles_once_over_three_iterations():
    policy_state, value_state = fresh_states(SGD)
    for seed in range(3):
        data = synthetic_rollout(seed, policy_state.params, value_state.params)
        policy_state, value_state, metrics = JITTED_UPDATE(
            policy_state, value_state, data, jax.random.key(seed), config=ORACLE_CONFIG)
        assert np.isfinite(float(metrics["ppo/total_loss"]))
    # One trace for the whole module (the oracle test shares this jitted function and shapes).
    assert len(_UPDATE_TRACES) == 1
    assert JITTED_UPDATE._cache_size() <= 2  # the first call's Python-int `step` may add an entry
    assert int(policy_state.step) == 3


# --- configuration and helpers ------------------------------------------------------------

def test_value_params_from_reward_model():
    value_params = value_params_from_reward_model(REWARD_PARAMS)
    jax.tree.map(np.testing.assert_array_equal, value_params["decoder"], REWARD_PARAMS["decoder"])
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(value_params["score"]))
    values = jax.jit(VALUE.apply)({"params": value_params}, *make_prompts(0, 4))
    assert np.all(np.asarray(values) == 0)
    with pytest.raises(ValueError, match="decoder"):
        value_params_from_reward_model({"decoder": {}, "lm_head": {}})


def test_kl_controller_choice():
    fixed = kl_controller(PPOConfig(kl_coef=0.1))
    state = fixed.update(fixed.init(), jnp.float32(20.0), n_steps=64)
    assert float(state.coef) == pytest.approx(0.1)
    adaptive = kl_controller(PPOConfig(kl_coef=0.1, adaptive_kl=True, kl_target=6.0, kl_horizon=1000.0))
    state = adaptive.update(adaptive.init(), jnp.float32(9.0), n_steps=64)
    # e = clip(9 / 6 - 1, -0.2, 0.2) = 0.2; coef * (1 + 0.2 * 64 / 1000)
    assert float(state.coef) == pytest.approx(0.1 * (1 + 0.2 * 64 / 1000))


@pytest.mark.parametrize("field, value", [
    ("num_minibatches", 0), ("epochs", 0), ("gamma", 1.5), ("gae_lambda", -0.1), ("kl_estimator", "k4"),
    ("aggregation", "median"), ("vf_coef", -1.0), ("clip_eps", 0.0),
    # optional settings the losses check: refused when the config is made, not after a rollout
    ("clip_eps_low", -0.1), ("clip_eps_high", 0.0), ("dual_clip", 0.5), ("value_clip_eps", -1.0),
    ("score_clip", 0.0), ("missing_eos_score", float("nan")), ("missing_eos_score", float("inf")),
])
def test_bad_config_raises(field, value):
    with pytest.raises(ValueError, match=field):
        PPOConfig(**{field: value})


def test_update_rejects_indivisible_batch():
    policy_state, value_state = fresh_states(optax.sgd(0.1))
    data = synthetic_rollout(0, POLICY_PARAMS, value_state.params)
    config = dataclasses.replace(ORACLE_CONFIG, num_minibatches=3)
    with pytest.raises(ValueError, match="num_minibatches"):
        ppo_update(policy_state, value_state, data, jax.random.key(0), config=config)
    with pytest.raises(ValueError, match="advantages"):
        ppo_update(policy_state, value_state, data.replace(advantages=None), jax.random.key(0),
                   config=ORACLE_CONFIG)
