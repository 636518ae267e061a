"""GRPO / RLOO: learning on a tiny verifiable task, group layout, advantages and a
hand-assembled gradient oracle for the update."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.training.grpo import (
    effective_scores,
    GRPO_STATIC_ARGNAMES,
    GRPOConfig,
    grpo_iteration,
    grpo_rollout,
    grpo_update,
    sequence_advantages,
)
from rlhf_jax.training.rollout import Rollout, SamplingConfig
from rlhf_jax.training.state import reference_params
from rl_problems import (EOS, PAD, POLICY_PARAMS, REF_PARAMS, fresh_policy_state, left_padded_prompts,
                         response_logp_and_entropy, target_fraction, with_random_responses)

PROMPT, RESPONSE, PROMPTS, GROUP = 4, 6, 8, 4
SAMPLING = SamplingConfig(max_new_tokens=RESPONSE, eos_token_id=EOS, pad_token_id=PAD)


def make_prompts(seed, batch=PROMPTS):
    return left_padded_prompts(seed, batch, PROMPT)


def scores_of(history):
    return np.array([m["objective/scores"] for m in history])


@pytest.fixture(scope="module")
def grpo_run():
    """20 GRPO iterations through one jitted `grpo_iteration` (k3 KL to a reference)."""
    config = GRPOConfig(sampling=SAMPLING, group_size=GROUP, kl_coef=0.01, epochs=2,
                        num_minibatches=2)
    traces = []

    def counted(*args, **kwargs):
        traces.append(1)
        return grpo_iteration(*args, **kwargs)

    step = jax.jit(counted, static_argnames=GRPO_STATIC_ARGNAMES, donate_argnames=("policy_state",))
    state = fresh_policy_state(optax.adam(3e-3, eps=1e-5))
    ref_params = reference_params(POLICY_PARAMS)
    rng, history = jax.random.key(1), []
    for iteration in range(20):
        rng, key = jax.random.split(rng)
        state, metrics = step(state, ref_params, *make_prompts(iteration), key, config=config,
                              score_fn=target_fraction)
        history.append(jax.tree.map(float, metrics))
    return history, len(traces)


def test_grpo_raises_mean_reward(grpo_run):
    history, traces = grpo_run
    scores = scores_of(history)
    assert scores[:3].mean() < 0.15
    assert scores[-5:].mean() > scores[:3].mean() + 0.3, scores
    assert traces == 1
    assert {"grpo/loss", "grpo/clipfrac", "grpo/kl", "grpo/entropy", "grpo/reward_std",
            "objective/scores", "objective/kl", "rollout/eos_rate", "optim/grad_norm"} <= set(history[0])
    assert all(np.isfinite(v) for m in history for v in m.values())
    assert history[-1]["grpo/kl"] > history[0]["grpo/kl"]


def test_rloo_raises_mean_reward_and_groups_are_contiguous():
    """RLOO (leave-one-out baseline, no KL term, no reference) via rollout + update jitted apart."""
    config = GRPOConfig(sampling=SAMPLING, group_size=GROUP, advantage_estimator="rloo", kl_coef=0.0,
                        epochs=2, num_minibatches=2)
    sample = jax.jit(functools.partial(grpo_rollout, config=config, score_fn=target_fraction))
    update = jax.jit(functools.partial(grpo_update, config=config), donate_argnames=("policy_state",))
    state = fresh_policy_state(optax.adam(3e-3, eps=1e-5))
    rng, scores = jax.random.key(2), []
    for iteration in range(20):
        rng, sample_key, shuffle_key = jax.random.split(rng, 3)
        prompt_ids, prompt_mask = make_prompts(100 + iteration)
        data = sample(state, None, prompt_ids, prompt_mask, sample_key)
        if iteration == 0:
            assert data.ref_logp is None
            np.testing.assert_array_equal(data.prompt_ids, prompt_ids)
            assert data.response_ids.shape == data.logp.shape == (PROMPTS, GROUP, RESPONSE)
            grouped = np.asarray(data.scores)
            assert grouped.shape == data.advantages.shape == (PROMPTS, GROUP)
            loo = grouped - (grouped.sum(1, keepdims=True) - grouped) / (GROUP - 1)
            np.testing.assert_allclose(data.advantages, loo, atol=1e-6)
        state, metrics = update(state, data, shuffle_key)
        scores.append(float(metrics["objective/scores"]))
    scores = np.array(scores)
    assert scores[-5:].mean() > scores[:3].mean() + 0.3, scores


# --- advantages ---------------------------------------------------------------------------

@pytest.mark.parametrize("estimator, scale", [("group", "group"), ("group", "batch"),
                                               ("group", "none"), ("rloo", "group")])
def test_sequence_advantages_oracle(estimator, scale):
    rng = np.random.default_rng(3)
    scores = rng.normal(size=12).astype(np.float32)
    has_eos = rng.random(12) > 0.3
    config = GRPOConfig(group_size=3, advantage_estimator=estimator, scale=scale, missing_eos_score=-2.0)
    got = np.asarray(sequence_advantages(scores, has_eos, config=config))
    grouped = np.where(has_eos, scores, -2.0).astype(np.float64).reshape(4, 3)
    mean = grouped.mean(1, keepdims=True)
    if estimator == "rloo":
        expected = grouped - (grouped.sum(1, keepdims=True) - grouped) / 2
    elif scale == "group":
        expected = (grouped - mean) / (grouped.std(1, ddof=1, keepdims=True) + 1e-4)
    elif scale == "batch":
        expected = (grouped - mean) / (grouped.std(ddof=1) + 1e-4)
    else:
        expected = grouped - mean
    np.testing.assert_allclose(got, expected.reshape(-1), rtol=1e-5, atol=1e-5)


# --- the update: a hand-assembled oracle ---------------------------------------------------

def full_logp(params, input_ids, attention_mask, temperature):
    return response_logp_and_entropy(params, input_ids, attention_mask, PROMPT, temperature)[0]


def test_update_matches_hand_assembled_gradient_step():
    """One pass, one minibatch, ratio 1: the step equals SGD on
    mean_b [ sum_t m (-A_b * rho_t + kl_coef * k3_t) / sum_t m ]."""
    kl_coef, temperature, lr, batch = 0.2, 0.9, 0.1, 8
    config = GRPOConfig(sampling=SamplingConfig(max_new_tokens=RESPONSE, temperature=temperature,
                                                eos_token_id=EOS, pad_token_id=PAD),
                        group_size=GROUP, kl_coef=kl_coef)
    rng = np.random.default_rng(5)
    input_ids, attention_mask, response_mask = with_random_responses(rng, *make_prompts(5, batch), RESPONSE)
    advantages = rng.normal(size=batch).astype(np.float32)
    groups = batch // GROUP
    grouped = lambda x: np.asarray(x).reshape(groups, GROUP, *np.shape(x)[1:])
    prompt_ids, prompt_mask = input_ids[::GROUP, :PROMPT], attention_mask[::GROUP, :PROMPT]
    # Responses of a group share their prompt: rows b*G .. b*G + G - 1 answer prompt b.
    input_ids[:, :PROMPT] = np.repeat(prompt_ids, GROUP, axis=0)
    attention_mask[:, :PROMPT] = np.repeat(prompt_mask, GROUP, axis=0)
    logp = np.asarray(full_logp(POLICY_PARAMS, input_ids, attention_mask, temperature)) * response_mask
    ref_logp = np.asarray(full_logp(REF_PARAMS, input_ids, attention_mask, temperature)) * response_mask
    data = Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=grouped(input_ids[:, PROMPT:]),
                   response_mask=grouped(response_mask), has_eos=np.ones((groups, GROUP), bool),
                   logp=grouped(logp), ref_logp=grouped(ref_logp),
                   scores=rng.normal(size=(groups, GROUP)).astype(np.float32), advantages=grouped(advantages))

    def oracle_loss(params):
        mask = jnp.asarray(response_mask, jnp.float32)
        current = full_logp(params, input_ids, attention_mask, temperature)
        ratio = jnp.exp(jnp.where(mask > 0, current - logp, 0.0))
        log_ref_ratio = jnp.where(mask > 0, ref_logp - current, 0.0)
        k3 = jnp.exp(log_ref_ratio) - 1 - log_ref_ratio
        per_token = -advantages[:, None] * ratio + kl_coef * k3
        return jnp.mean(jnp.sum(per_token * mask, 1) / jnp.sum(mask, 1))

    loss, grads = jax.jit(jax.value_and_grad(oracle_loss))(POLICY_PARAMS)
    state = fresh_policy_state(optax.sgd(lr))
    state, metrics = jax.jit(functools.partial(grpo_update, config=config))(state, data, jax.random.key(0))
    expected = jax.tree.map(lambda p, g: p - lr * g, POLICY_PARAMS, grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5), state.params, expected)
    assert float(metrics["grpo/loss"]) == pytest.approx(float(loss), abs=1e-5)
    assert float(metrics["grpo/clipfrac"]) == 0.0
    assert float(metrics["grpo/kl"]) > 0
    # equal scores but responses without EOS: with missing_eos_score the groups do not tie
    has_eos = np.asarray([[True, False, True, True], [True, True, True, True]])[:, :GROUP]
    tied = data.replace(scores=np.ones((groups, GROUP), np.float32), has_eos=has_eos)
    effective = np.where(has_eos, 1.0, -1.0)
    for missing, stds in ((None, np.zeros(groups)), (-1.0, effective.std(axis=1, ddof=1))):
        options = dataclasses.replace(config, missing_eos_score=missing)
        np.testing.assert_array_equal(effective_scores(tied.scores, has_eos, config=options),
                                      tied.scores if missing is None else effective)
        _, metrics = jax.jit(functools.partial(grpo_update, config=options))(
            fresh_policy_state(optax.sgd(lr)), tied, jax.random.key(0))
        assert float(metrics["grpo/reward_std"]) == pytest.approx(stds.mean(), abs=1e-6)
        assert float(metrics["grpo/zero_std_fraction"]) == np.mean(stds == 0)
    # mask_truncated can leave a minibatch without counted tokens: the update metrics are
    # those of the steps with tokens (SGD: the empty step changes nothing), not halved by a 0
    emptied = data.replace(response_mask=data.response_mask * np.asarray([1, 0])[:, None, None])
    split = dataclasses.replace(config, num_minibatches=2)
    _, metrics = jax.jit(functools.partial(grpo_update, config=split))(
        fresh_policy_state(optax.sgd(lr)), emptied, jax.random.key(0))
    alone = jax.tree.map(lambda x: x[:1], emptied)
    _, expected = jax.jit(functools.partial(grpo_update, config=config))(
        fresh_policy_state(optax.sgd(lr)), alone, jax.random.key(0))
    for key in ("grpo/loss", "grpo/kl", "grpo/ratio_mean", "grpo/entropy", "optim/grad_norm"):
        assert float(metrics[key]) == pytest.approx(float(expected[key]), rel=1e-5), key
    assert float(metrics["grpo/ratio_mean"]) == pytest.approx(1.0, abs=1e-6)


# --- configuration ------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("group_size", 1), ("advantage_estimator", "ppo"), ("scale", "max"), ("kl_coef", -0.1),
    ("importance_level", "word"), ("epochs", 0), ("num_minibatches", 0),
    ("aggregation", "median"), ("missing_eos_score", float("nan")),
])
def test_bad_config_raises(field, value):
    with pytest.raises(ValueError, match=field):
        GRPOConfig(**{field: value})


def test_rloo_takes_no_scale():
    """RLOO's leave-one-out advantages are not scaled: a `scale` other than the default is
    refused rather than silently ignored (a config error naming `grpo.scale` in the CLI)."""
    GRPOConfig(advantage_estimator="rloo")
    with pytest.raises(ValueError, match=r"`scale` \('batch'\) applies to advantage_estimator 'group' only"):
        GRPOConfig(advantage_estimator="rloo", scale="batch")


def test_reference_required_when_kl_coef_positive():
    state = fresh_policy_state(optax.sgd(0.1))
    with pytest.raises(ValueError, match="ref_params"):
        grpo_rollout(state, None, *make_prompts(0), jax.random.key(0),
                     config=GRPOConfig(sampling=SAMPLING, kl_coef=0.1), score_fn=target_fraction)


def test_minibatches_must_hold_whole_groups():
    """Minibatches are formed over prompt groups (each group's prompt runs once per
    minibatch): `num_minibatches` must divide the number of prompts, not only of responses."""
    config = GRPOConfig(sampling=SAMPLING, group_size=GROUP, kl_coef=0.0, num_minibatches=3)
    state = fresh_policy_state(optax.sgd(0.1))
    sample = functools.partial(grpo_rollout, config=config, score_fn=target_fraction)
    # the rollout's shapes are all the check reads: traced, not compiled or run
    data = jax.eval_shape(sample, state, None, *make_prompts(0, 4), jax.random.key(0))
    assert data.response_ids.shape[:2] == (4, GROUP)  # 16 responses would split into 4 or 8, not 3
    with pytest.raises(ValueError, match="4 prompt groups.*num_minibatches.*whole groups"):
        grpo_update(state, data, jax.random.key(1), config=config)
    with pytest.raises(ValueError, match="group_size"):
        sequence_advantages(np.zeros((4, 3), np.float32), np.ones((4, 3), bool), config=config)
