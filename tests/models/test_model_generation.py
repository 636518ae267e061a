"""generate(): greedy parity with transformers, log-probs, top-k/top-p, EOS handling."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_oracles import PAD_ID, padded_batch
from rlhf_jax.models.checkpoint_io import load_pretrained
from rlhf_jax.models.generation import GENERATE_STATIC_ARGNAMES, generate, jitted_generate
from rlhf_jax.models.heads import RewardModel
from rlhf_jax.models.sampling import top_k_filter
from rlhf_jax.ops.kept_set import kept_set_logits
from rlhf_jax.ops.logprobs import token_logprobs

NEW_TOKENS = 10
EOS_ID = 2
jit_generate = jax.jit(generate, static_argnames=GENERATE_STATIC_ARGNAMES)
jit_forward = jax.jit(lambda module, params, ids, mask: module.apply({"params": params}, ids, mask),
                      static_argnums=0)


@pytest.fixture(scope="module")
def models(hf_lm):
    return {family: load_pretrained(hf_lm[family][0]) for family in ("gpt2", "llama")}


def prompts(seed=0):
    ids, mask = padded_batch(seed, batch=4, time=8, side="left")
    return ids, mask


def run(module, params, ids, mask, seed=0, **options):
    options = {"max_new_tokens": NEW_TOKENS, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, **options}
    return jit_generate(module, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(seed), **options)


def fresh_logprobs(module, params, ids, mask, out, temperature):
    """log_softmax(logits / T) of each generated token from one forward pass over prompt+response."""
    full_ids = jnp.concatenate([jnp.asarray(ids), out.tokens], axis=1)
    full_mask = jnp.concatenate([jnp.asarray(mask), out.mask], axis=1)
    logits = jit_forward(module, params, full_ids, full_mask)
    response_logits = logits[:, ids.shape[1] - 1:-1] / temperature
    logp = jax.nn.log_softmax(response_logits, axis=-1)
    return np.asarray(jnp.take_along_axis(logp, out.tokens[..., None], axis=-1)[..., 0]), np.asarray(response_logits)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_matches_transformers_generate(family, hf_lm, models):
    module, params = models[family]
    _, torch_model = hf_lm[family]
    ids, mask = prompts(seed=1)
    with torch.no_grad():
        expected = torch_model.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
            max_new_tokens=NEW_TOKENS, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        )[:, ids.shape[1]:].numpy()
    out = run(module, params, ids, mask, greedy=True)
    tokens = np.asarray(out.tokens)
    assert tokens.shape == (4, NEW_TOKENS) and tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens[:, :expected.shape[1]], expected)
    assert (tokens[:, expected.shape[1]:] == PAD_ID).all()  # transformers stops when all rows end
    assert len(np.unique(tokens)) > 3  # not a degenerate repetition


def test_sampled_logprobs_match_a_fresh_forward_pass(models):
    module, params = models["llama"]
    ids, mask = prompts(seed=2)
    out = run(module, params, ids, mask, seed=3, temperature=0.7)
    expected, _ = fresh_logprobs(module, params, ids, mask, out, temperature=0.7)
    response_mask = np.asarray(out.mask).astype(bool)
    np.testing.assert_allclose(np.asarray(out.logprobs)[response_mask], expected[response_mask], atol=1e-4)
    assert (np.asarray(out.logprobs)[~response_mask] == 0).all()
    # same key, same sample; another key, another sample; temperature is not a static argument
    again = run(module, params, ids, mask, seed=3, temperature=0.7)
    np.testing.assert_array_equal(again.tokens, out.tokens)
    other = run(module, params, ids, mask, seed=4, temperature=0.7)
    assert not np.array_equal(other.tokens, out.tokens)


def test_top_k_one_equals_greedy(models):
    module, params = models["llama"]
    ids, mask = prompts(seed=5)
    greedy = run(module, params, ids, mask, greedy=True)
    top1 = run(module, params, ids, mask, seed=6, top_k=1)
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)
    np.testing.assert_array_equal(top1.mask, greedy.mask)
    np.testing.assert_allclose(top1.logprobs, greedy.logprobs, atol=1e-5)


def test_num_samples_shares_the_prefill_and_equals_repeated_prompts(models):
    """G samples per prompt from one prefill: the same tokens and log-probs as `generate` on
    the prompts repeated G times (rows b*G + g)."""
    module, params = models["llama"]
    ids, mask = prompts(seed=8)
    options = dict(seed=9, temperature=0.8, top_k=20, top_p=0.95, kept_set=True)
    grouped = run(module, params, ids, mask, num_samples=3, **options)
    repeated = run(module, params, np.repeat(ids, 3, axis=0), np.repeat(mask, 3, axis=0), **options)
    assert grouped.tokens.shape == (12, NEW_TOKENS)
    np.testing.assert_array_equal(grouped.tokens, repeated.tokens)
    np.testing.assert_array_equal(grouped.mask, repeated.mask)
    np.testing.assert_array_equal(grouped.finished, repeated.finished)
    for name in ("logprobs", "kept_logprobs", "kept_threshold"):
        np.testing.assert_allclose(getattr(grouped, name), getattr(repeated, name), atol=1e-5)
    assert not all(np.array_equal(grouped.tokens[0], grouped.tokens[g]) for g in (1, 2))
    assert run(module, params, ids, mask).kept_threshold is None  # off by default
    with pytest.raises(ValueError, match="num_samples"):
        run(module, params, ids, mask, num_samples=0)


def test_kept_set_logprobs_replay_from_a_fresh_forward_pass(models):
    """The sampler's kept-set log-probs equal a forward pass scored under the stored
    thresholds (`kept_set_logits`); they exceed the full-distribution log-probs."""
    module, params = models["gpt2"]
    ids, mask = prompts(seed=10)
    out = run(module, params, ids, mask, seed=11, temperature=1.3, top_k=5, top_p=0.8, kept_set=True)
    _, scaled = fresh_logprobs(module, params, ids, mask, out, temperature=1.3)
    replayed = token_logprobs(kept_set_logits(jnp.asarray(scaled), out.tokens, out.kept_threshold), out.tokens)
    valid = np.asarray(out.mask).astype(bool)
    np.testing.assert_allclose(np.asarray(replayed)[valid], np.asarray(out.kept_logprobs)[valid], atol=1e-4)
    assert (np.asarray(out.kept_logprobs)[valid] >= np.asarray(out.logprobs)[valid]).all()
    assert (np.asarray(out.kept_logprobs)[~valid] == 0).all()


def test_top_k_and_top_p_only_draw_allowed_tokens(models):
    module, params = models["gpt2"]
    ids, mask = prompts(seed=7)
    temperature = 1.3
    for seed in range(3):
        out = run(module, params, ids, mask, seed=seed, temperature=temperature, top_k=5, top_p=0.8)
        expected, scaled = fresh_logprobs(module, params, ids, mask, out, temperature)
        valid = np.asarray(out.mask).astype(bool)
        np.testing.assert_allclose(np.asarray(out.logprobs)[valid], expected[valid], atol=1e-4)
        allowed_k = np.isfinite(np.asarray(top_k_filter(jnp.asarray(scaled.reshape(-1, scaled.shape[-1])), 5)))
        probs = jax.nn.softmax(jnp.where(allowed_k, scaled.reshape(allowed_k.shape), -jnp.inf), axis=-1)
        tokens = np.asarray(out.tokens).reshape(-1)
        chosen = np.asarray(probs)[np.arange(len(tokens)), tokens]
        mass_above = np.sum(np.where(np.asarray(probs) > chosen[:, None], np.asarray(probs), 0), axis=1)
        assert allowed_k[np.arange(len(tokens)), tokens][valid.reshape(-1)].all()
        assert (mass_above[valid.reshape(-1)] < 0.8 + 1e-5).all()  # inside the nucleus


def test_eos_stops_rows_and_pads_after(models):
    module, params = models["llama"]
    ids, mask = prompts(seed=8)
    free = np.asarray(run(module, params, ids, mask, greedy=True, eos_token_id=None).tokens)
    eos = int(free[0, 2])  # a token greedy decoding emits in row 0 at step <= 2
    out = run(module, params, ids, mask, greedy=True, eos_token_id=eos, pad_token_id=PAD_ID)
    tokens, out_mask, logprobs = map(np.asarray, (out.tokens, out.mask, out.logprobs))
    for row in range(free.shape[0]):
        hits = np.nonzero(free[row] == eos)[0]
        if len(hits) == 0:
            np.testing.assert_array_equal(tokens[row], free[row])
            assert out_mask[row].all() and not out.finished[row]
            continue
        first = hits[0]
        np.testing.assert_array_equal(tokens[row, :first + 1], free[row, :first + 1])
        assert (tokens[row, first + 1:] == PAD_ID).all()
        np.testing.assert_array_equal(out_mask[row], np.arange(NEW_TOKENS) <= first)
        assert (logprobs[row, first + 1:] == 0).all() and (logprobs[row, :first + 1] < 0).all()
        assert out.finished[row]
    assert out.finished[0]


def test_pad_equal_to_eos_still_masks_after_the_first_eos(models):
    module, params = models["llama"]
    ids, mask = prompts(seed=8)
    free = np.asarray(run(module, params, ids, mask, greedy=True, eos_token_id=None).tokens)
    eos = int(free[0, 2])
    out = run(module, params, ids, mask, greedy=True, eos_token_id=eos, pad_token_id=eos)
    first = np.nonzero(free[0] == eos)[0][0]
    np.testing.assert_array_equal(np.asarray(out.mask[0]), np.arange(NEW_TOKENS) <= first)


def test_invalid_arguments_raise(models):
    module, params = models["gpt2"]
    ids, mask = prompts()
    call = partial(generate, module, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(0),
                   eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    with pytest.raises(ValueError, match="max_new_tokens"):
        call(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        call(max_new_tokens=2, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        call(max_new_tokens=2, top_k=-1)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        call(max_new_tokens=60)
    with pytest.raises(ValueError, match="prompt_mask"):
        generate(module, params, jnp.asarray(ids), jnp.asarray(mask)[:, 1:], jax.random.PRNGKey(0),
                 max_new_tokens=2, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    with pytest.raises(ValueError, match="eos_token_id"):
        call(max_new_tokens=2, eos_token_id="</s>")
    with pytest.raises(ValueError, match="CausalLM"):
        generate(RewardModel(module.config), params, jnp.asarray(ids), jnp.asarray(mask),
                 jax.random.PRNGKey(0), max_new_tokens=2, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    with pytest.raises(ValueError, match="pad_token_id"):
        call(max_new_tokens=2, pad_token_id=None)
    with pytest.raises(ValueError, match="pad_token_id"):
        call(max_new_tokens=2, pad_token_id=True)
    with pytest.raises(ValueError, match=r"`temperature` must be > 0, got 0.0; .*pass `greedy=True`"):
        call(max_new_tokens=2, temperature=0.0)


def test_right_padded_prompts_raise_naming_the_row_and_the_fix(models):
    module, params = models["llama"]
    ids, mask = prompts()
    right_ids, right_mask = padded_batch(0, batch=4, time=8, side="right")
    assert not right_mask[:, -1].all()  # rows 1.. are shorter: padding at the end
    for fn in (generate, jitted_generate):
        with pytest.raises(ValueError, match=r"`prompt_mask` row 1 ends in padding .*padding_side = \"left\""):
            fn(module, params, jnp.asarray(right_ids), jnp.asarray(right_mask), jax.random.PRNGKey(0),
               max_new_tokens=2, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    holed = mask.copy()
    holed[0, 3] = 0
    with pytest.raises(ValueError, match="`prompt_mask` row 0 has padding at column 3 between real tokens"):
        generate(module, params, jnp.asarray(ids), jnp.asarray(holed), jax.random.PRNGKey(0),
                 max_new_tokens=2, eos_token_id=EOS_ID, pad_token_id=PAD_ID)


def test_rows_of_batch_padding_are_accepted_and_leave_the_other_rows_alone(models):
    """An all-zero prompt mask (the pipeline's padding of an incomplete batch) is valid."""
    module, params = models["llama"]
    ids, mask = prompts(seed=4)
    padded_ids = np.concatenate([ids, np.full((1, ids.shape[1]), PAD_ID)])
    padded_mask = np.concatenate([mask, np.zeros((1, mask.shape[1]), mask.dtype)])
    out = generate(module, params, jnp.asarray(padded_ids), jnp.asarray(padded_mask), jax.random.PRNGKey(0),
                   max_new_tokens=4, greedy=True, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    alone = run(module, params, ids, mask, greedy=True, max_new_tokens=4)
    np.testing.assert_array_equal(np.asarray(out.tokens)[:-1], alone.tokens)


def test_jitted_generate_takes_a_list_of_eos_ids_and_numpy_ints(models):
    """A Hugging Face generation_config often holds a list of EOS ids, which `jax.jit` cannot
    hash as a static argument; `jitted_generate` converts it (and NumPy ints) first."""
    module, params = models["llama"]
    ids, mask = prompts(seed=8)
    free = np.asarray(run(module, params, ids, mask, greedy=True, eos_token_id=None).tokens)
    eos = (int(free[0, 2]), int(free[1, 1]))
    expected = run(module, params, ids, mask, greedy=True, eos_token_id=eos)
    with pytest.raises(ValueError, match="Non-hashable static arguments"):  # why the helper exists
        run(module, params, ids, mask, greedy=True, eos_token_id=list(eos))
    for eos_token_id in (list(eos), [np.int64(i) for i in eos], np.array(eos).tolist()):
        out = jitted_generate(module, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(0),
                              max_new_tokens=NEW_TOKENS, greedy=True, eos_token_id=eos_token_id,
                              pad_token_id=np.int64(PAD_ID))
        np.testing.assert_array_equal(out.tokens, expected.tokens)
        np.testing.assert_array_equal(out.mask, expected.mask)
    eager = generate(module, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(0),
                     max_new_tokens=NEW_TOKENS, greedy=True, eos_token_id=np.int32(eos[0]),
                     pad_token_id=np.int64(PAD_ID))
    single = run(module, params, ids, mask, greedy=True, eos_token_id=eos[0])
    np.testing.assert_array_equal(eager.tokens, single.tokens)
