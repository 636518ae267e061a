"""Rollout plumbing: layout, masks after EOS, log-probs, values, scores, shaping and GAE,
each checked against full-forward + NumPy oracles written from docs/numerics.md.

The rollout is `[B, N = 1, R]` (the `LMBatch` layout); the oracles read it through
`flat_view`, one joined `[B, P + R]` row per response."""
import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.training.rollout import (
    SamplingConfig,
    generate_rollout,
    host_scorer,
    ppo_advantages,
    rollout,
    rollout_metrics,
    score_rollout,
)
from rlhf_jax.training.state import create_train_state
from rl_problems import (EOS, PAD, POLICY, POLICY_PARAMS, REF_PARAMS, REWARD, TARGET, VALUE, init_params,
                         left_padded_prompts, target_fraction, with_score_head)

BATCH, PROMPT, RESPONSE = 16, 5, 8
TEMPERATURE, KL_COEF, GAMMA, GAE_LAMBDA = 0.7, 0.1, 0.97, 0.9
REWARD_PARAMS = init_params(REWARD, 3)
# A non-zero value head, so the values are not trivially 0.
VALUE_PARAMS = with_score_head(init_params(VALUE, 2), 4, scale=0.5, bias=0.3)
SAMPLING = SamplingConfig(max_new_tokens=RESPONSE, temperature=TEMPERATURE, eos_token_id=EOS,
                          pad_token_id=PAD)
PROMPT_IDS, PROMPT_MASK = left_padded_prompts(0, BATCH, PROMPT)


def states():
    return (create_train_state(POLICY, POLICY_PARAMS, optax.sgd(0.1)),
            create_train_state(VALUE, VALUE_PARAMS, optax.sgd(0.1)))


def flat_view(data):
    """The rollout's arrays with one row per response: `input_ids` / `attention_mask`
    `[B*N, P + R]` (prompt then response), per-token arrays `[B*N, R]`, per-response `[B*N]`."""
    input_ids, attention_mask = (np.asarray(x) for x in data.batch.joined())
    fields = {name: np.asarray(getattr(data, name)).reshape(-1, *np.shape(getattr(data, name))[2:])
              for name in ("response_ids", "response_mask", "has_eos", "logp", "ref_logp", "values",
                           "scores", "rewards", "advantages", "returns")
              if getattr(data, name) is not None}
    fields.setdefault("ref_logp", None)
    fields.setdefault("values", None)
    return types.SimpleNamespace(input_ids=input_ids, attention_mask=attention_mask, **fields)


@pytest.fixture(scope="module")
def rolled_grouped():
    """(generate_rollout output, rollout output) `[B, 1, R]` from the same key, in one compiled call."""

    def run(policy_state, value_state, ref_params, prompt_ids, prompt_mask, rng):
        generated = generate_rollout(policy_state, prompt_ids, prompt_mask, rng, sampling=SAMPLING)
        full = rollout(policy_state, ref_params, prompt_ids, prompt_mask, rng, sampling=SAMPLING,
                       kl_coef=KL_COEF, value_state=value_state, score_fn=target_fraction,
                       kl_estimator="k3", gamma=GAMMA, gae_lambda=GAE_LAMBDA)
        return generated, full

    policy_state, value_state = states()
    out = jax.jit(run)(policy_state, value_state, REF_PARAMS, PROMPT_IDS, PROMPT_MASK, jax.random.key(7))
    return jax.tree.map(np.asarray, out)


@pytest.fixture(scope="module")
def rolled(rolled_grouped):
    return tuple(flat_view(data) for data in rolled_grouped)


# --- NumPy oracles ------------------------------------------------------------------------

def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def oracle_logp(params, data, temperature):
    """Full-sequence forward, then log_softmax(logits / T) at position P + j - 1 for token P + j."""
    logits = np.asarray(POLICY.apply({"params": params}, data.input_ids, data.attention_mask))
    logp_all = np_log_softmax(logits / temperature)
    out = np.zeros((BATCH, RESPONSE))
    for b in range(BATCH):
        for j in range(RESPONSE):
            out[b, j] = logp_all[b, PROMPT + j - 1, data.input_ids[b, PROMPT + j]]
    return out * data.response_mask


def oracle_values(data):
    values = np.asarray(VALUE.apply({"params": VALUE_PARAMS}, data.input_ids, data.attention_mask))
    return values[:, PROMPT - 1:PROMPT - 1 + RESPONSE] * data.response_mask


def last_index(mask):
    return np.array([np.nonzero(row)[0].max() if row.any() else 0 for row in mask])


def oracle_rewards(scores, logp, ref_logp, mask, coef, missing=None, has_eos=None):
    log_ratio = ref_logp - logp
    k3 = np.exp(log_ratio) - 1 - log_ratio
    rewards = -coef * k3 * mask
    if missing is not None:
        scores = np.where(has_eos, scores, missing)
    for b, t in enumerate(last_index(mask)):
        rewards[b, t] += scores[b]
    return rewards


def oracle_gae(rewards, values, mask, gamma, gae_lambda):
    advantages = np.zeros_like(rewards, np.float64)
    for b in range(rewards.shape[0]):
        next_value, next_adv = 0.0, 0.0
        for t in reversed(range(rewards.shape[1])):
            if not mask[b, t]:
                continue
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            next_adv = delta + gamma * gae_lambda * next_adv
            advantages[b, t], next_value = next_adv, values[b, t]
    return advantages, (advantages + values) * mask


def np_whiten(x, mask, shift_mean=True):
    counted = x[mask != 0]
    mean, var = counted.mean(), counted.var(ddof=1)
    out = (x - mean) / np.sqrt(var + 1e-8)
    return (out + mean if not shift_mean else out) * mask


# --- tests --------------------------------------------------------------------------------

def test_layout_and_masks_after_eos(rolled, rolled_grouped):
    grouped = rolled_grouped[1]
    np.testing.assert_array_equal(grouped.prompt_ids, PROMPT_IDS)
    np.testing.assert_array_equal(grouped.prompt_mask, PROMPT_MASK)
    assert grouped.response_ids.shape == grouped.response_mask.shape == (BATCH, 1, RESPONSE)
    assert grouped.logp.shape == grouped.values.shape == grouped.advantages.shape == (BATCH, 1, RESPONSE)
    assert grouped.scores.shape == grouped.has_eos.shape == (BATCH, 1)
    assert grouped.kept_threshold is None  # no top-k / top-p
    _, data = rolled
    assert data.input_ids.shape == (BATCH, PROMPT + RESPONSE)
    assert data.response_mask.shape == data.logp.shape == data.values.shape == (BATCH, RESPONSE)
    assert data.scores.shape == data.has_eos.shape == (BATCH,)
    np.testing.assert_array_equal(data.input_ids[:, :PROMPT], PROMPT_IDS)
    np.testing.assert_array_equal(data.attention_mask,
                                  np.concatenate([PROMPT_MASK, data.response_mask], axis=1))
    response = data.input_ids[:, PROMPT:]
    assert 0 < data.has_eos.sum() < BATCH, "the fixture should hold rows with and without EOS"
    for b in range(BATCH):
        eos_at = np.nonzero(response[b] == EOS)[0]
        stop = eos_at[0] + 1 if eos_at.size else RESPONSE
        np.testing.assert_array_equal(data.response_mask[b], np.arange(RESPONSE) < stop)
        assert np.all(response[b, stop:] == PAD)
        assert bool(data.has_eos[b]) == bool(eos_at.size)
        assert np.all(data.logp[b, stop:] == 0) and np.all(data.advantages[b, stop:] == 0)


def test_generate_and_forward_logprobs_agree(rolled):
    generated, data = rolled
    np.testing.assert_array_equal(generated.input_ids, data.input_ids)
    np.testing.assert_allclose(generated.logp, data.logp, atol=1e-4)
    np.testing.assert_allclose(data.logp, oracle_logp(POLICY_PARAMS, data, TEMPERATURE), atol=1e-5)
    # Temperature is applied: the T = 1 log-probs differ.
    assert np.abs(oracle_logp(POLICY_PARAMS, data, 1.0) - data.logp).max() > 1e-3


def test_reference_logprobs_and_values(rolled):
    _, data = rolled
    np.testing.assert_allclose(data.ref_logp, oracle_logp(REF_PARAMS, data, TEMPERATURE), atol=1e-5)
    np.testing.assert_allclose(data.values, oracle_values(data), atol=1e-5)
    assert np.abs(data.values).max() > 0.05


def test_scores_and_rewards_at_last_response_token(rolled):
    _, data = rolled
    response = data.input_ids[:, PROMPT:]
    expected_scores = ((response == TARGET) * data.response_mask).sum(1) / data.response_mask.sum(1)
    np.testing.assert_allclose(data.scores, expected_scores, atol=1e-6)
    expected = oracle_rewards(data.scores, data.logp, data.ref_logp, data.response_mask, KL_COEF)
    np.testing.assert_allclose(data.rewards, expected, atol=1e-5)
    # The score sits on the EOS token itself for rows that stopped.
    for b in np.nonzero(data.has_eos)[0]:
        eos_slot = np.nonzero(response[b] == EOS)[0][0]
        assert last_index(data.response_mask[b:b + 1])[0] == eos_slot


def test_advantages_and_returns_match_gae(rolled):
    _, data = rolled
    advantages, returns = oracle_gae(data.rewards, data.values, data.response_mask, GAMMA, GAE_LAMBDA)
    np.testing.assert_allclose(data.returns, returns, atol=1e-5)
    np.testing.assert_allclose(data.advantages, np_whiten(advantages, data.response_mask), atol=1e-4)


def test_missing_eos_score_and_reward_whitening(rolled, rolled_grouped):
    _, data = rolled
    out = flat_view(ppo_advantages(rolled_grouped[1], kl_coef=0.3, kl_estimator="k3", gamma=1.0, gae_lambda=0.95,
                         whiten_rewards=True, whiten_advantages=False, missing_eos_score=-1.0))
    rewards = oracle_rewards(data.scores, data.logp, data.ref_logp, data.response_mask, 0.3,
                             missing=-1.0, has_eos=data.has_eos)
    np.testing.assert_allclose(out.rewards, rewards, atol=1e-5)
    whitened = np_whiten(rewards, data.response_mask, shift_mean=False)
    advantages, returns = oracle_gae(whitened, data.values, data.response_mask, 1.0, 0.95)
    np.testing.assert_allclose(out.advantages, advantages, atol=1e-4)
    np.testing.assert_allclose(out.returns, returns, atol=1e-4)


def test_rollout_metrics(rolled, rolled_grouped):
    _, data = rolled
    metrics = jax.tree.map(float, rollout_metrics(rolled_grouped[1]))
    mask = data.response_mask
    assert metrics["rollout/response_length"] == pytest.approx(mask.sum(1).mean())
    assert metrics["rollout/eos_rate"] == pytest.approx(data.has_eos.mean())
    assert metrics["objective/scores"] == pytest.approx(data.scores.mean(), abs=1e-6)
    kl = ((data.logp - data.ref_logp) * mask).sum(1).mean()
    assert metrics["objective/kl"] == pytest.approx(kl, abs=1e-5)
    assert metrics["objective/rlhf_reward"] == pytest.approx((data.rewards * mask).sum(1).mean(), abs=1e-5)


def test_reward_model_and_host_scorer(rolled_grouped):
    generated = rolled_grouped[0]
    policy_state, _ = states()
    calls = []

    def numpy_target_fraction(prompt_ids, response_ids, response_mask):
        calls.append(prompt_ids.shape)
        assert isinstance(response_ids, np.ndarray)
        return ((response_ids == TARGET) * response_mask).sum(1) / np.maximum(response_mask.sum(1), 1)

    on_host = host_scorer(numpy_target_fraction)

    def run(policy_state, reward_params, data):
        by_model = score_rollout(data, policy_state, None, sampling=SAMPLING, reward_module=REWARD,
                                 reward_params=reward_params)
        by_host = score_rollout(data, policy_state, None, sampling=SAMPLING, score_fn=on_host)
        return by_model, by_host

    by_model, by_host = jax.jit(run)(policy_state, REWARD_PARAMS, generated)
    assert calls == [(BATCH, PROMPT)]
    assert by_model.scores.shape == by_host.scores.shape == (BATCH, 1)
    generated, by_model, by_host = flat_view(generated), flat_view(by_model), flat_view(by_host)
    assert by_model.ref_logp is None and by_model.values is None
    expected = ((generated.response_ids == TARGET) * generated.response_mask).sum(1)
    np.testing.assert_allclose(by_host.scores, expected / generated.response_mask.sum(1), atol=1e-6)
    # Reward model: the score head at the last real token (the EOS token when present).
    token_scores = np.asarray(REWARD.apply({"params": REWARD_PARAMS}, generated.input_ids,
                                           generated.attention_mask, method="token_scores"))
    last = last_index(generated.attention_mask)
    np.testing.assert_allclose(by_model.scores, token_scores[np.arange(BATCH), last], atol=1e-5)


def test_generate_logprob_source_keeps_sampler_logprobs(rolled_grouped):
    generated, data = rolled_grouped
    policy_state, _ = states()
    sampling = dataclasses.replace(SAMPLING, logprobs_source="generate")
    out = score_rollout(generated, policy_state, None, sampling=sampling, score_fn=target_fraction)
    np.testing.assert_array_equal(out.logp, generated.logp)
    assert out.ref_logp is None


def test_bad_inputs_raise(rolled_grouped):
    generated, _ = rolled_grouped
    policy_state, _ = states()
    with pytest.raises(ValueError, match="exactly one"):
        score_rollout(generated, policy_state, None, sampling=SAMPLING)
    with pytest.raises(ValueError, match="exactly one"):
        score_rollout(generated, policy_state, None, sampling=SAMPLING, score_fn=target_fraction,
                      reward_module=REWARD, reward_params=REWARD_PARAMS)
    with pytest.raises(ValueError, match="reward_params"):
        score_rollout(generated, policy_state, None, sampling=SAMPLING, reward_module=REWARD)
    with pytest.raises(ValueError, match="shape"):
        score_rollout(generated, policy_state, None, sampling=SAMPLING,
                      score_fn=lambda p, r, m: jnp.zeros((BATCH, 2)))
    with pytest.raises(ValueError, match="ref_logp"):
        ppo_advantages(generated.replace(scores=np.zeros((BATCH, 1), np.float32)), kl_coef=0.1)
    with pytest.raises(ValueError, match="prompt_ids"):
        generate_rollout(policy_state, PROMPT_IDS[0], PROMPT_MASK[0], jax.random.key(0), sampling=SAMPLING)
    with pytest.raises(ValueError, match="CausalLM"):
        value_state = create_train_state(VALUE, VALUE_PARAMS, optax.sgd(0.1))
        generate_rollout(value_state, PROMPT_IDS, PROMPT_MASK, jax.random.key(0), sampling=SAMPLING)
    with pytest.raises(ValueError, match="logprobs_source"):
        SamplingConfig(logprobs_source="cache")
    with pytest.raises(ValueError, match=r"`temperature` must be > 0, got 0.0; .*pass `greedy=True`"):
        SamplingConfig(temperature=0.0)
    with pytest.raises(ValueError, match=r"`top_p` must be a static float in \(0, 1\]"):
        SamplingConfig(top_p=1.5)
    with pytest.raises(ValueError, match=r"`top_k` must be a static int >= 0"):
        SamplingConfig(top_k=-1)
    # ids read from arrays (NumPy ints) are stored as Python ints, so the config stays hashable
    from_numpy = SamplingConfig(eos_token_id=np.int64(EOS), pad_token_id=np.int32(0))
    assert from_numpy == SamplingConfig(eos_token_id=EOS, pad_token_id=0) and type(from_numpy.eos_token_id) is int
    hash(from_numpy)
    with pytest.raises(ValueError, match=r"`eos_token_id` must be a token id \(an int >= 0\), a tuple of them or None, got True"):
        SamplingConfig(eos_token_id=True)
    right_mask = np.asarray(PROMPT_MASK)[:, ::-1]  # real tokens first: right-padded
    assert not right_mask[:, -1].all()
    with pytest.raises(ValueError, match=r"`prompt_mask` row \d+ ends in padding"):
        generate_rollout(policy_state, PROMPT_IDS, right_mask, jax.random.key(0), sampling=SAMPLING)


def test_pad_equal_to_eos_gives_the_same_rollout():
    """A tokenizer without a pad token pads with EOS (TRL's convention): the rollout's masks,
    EOS flags and log-probs are those of a distinct pad id, and only the ids after EOS differ."""
    policy_state, _ = states()
    eos_padded = dataclasses.replace(SAMPLING, pad_token_id=EOS)
    run = jax.jit(generate_rollout, static_argnames=("sampling",))
    distinct, same = (jax.tree.map(np.asarray, run(policy_state, PROMPT_IDS, PROMPT_MASK, jax.random.key(3),
                                                   sampling=sampling))
                      for sampling in (SAMPLING, eos_padded))
    assert 0 < distinct.has_eos.mean() < 1  # some responses stop early, some run to the end
    np.testing.assert_array_equal(same.response_mask, distinct.response_mask)
    np.testing.assert_array_equal(same.has_eos, distinct.has_eos)
    np.testing.assert_array_equal(same.logp, distinct.logp)
    real = distinct.response_mask != 0
    np.testing.assert_array_equal(same.response_ids[real], distinct.response_ids[real])
    assert np.all(same.response_ids[~real] == EOS) and np.all(distinct.response_ids[~real] == PAD)
