"""Qwen3, Mistral, Gemma 2 and Gemma 3 text against transformers + torch (CPU, float32).

Every tiny model has sliding windows (WINDOW = 4) shorter than the sequences, so the window
shapes each parity check: logits with left and right padding, greedy generation against
`generate`, save -> transformers -> load round trips, and KV-cache decoding past the window.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_oracles import NEW_FAMILIES, PAD_ID, WINDOW, padded_batch, torch_logits
from rlhf_jax.models.checkpoint_io import load_pretrained, save_pretrained
from rlhf_jax.models.config import SLIDING_ATTENTION
from rlhf_jax.models.generation import GENERATE_STATIC_ARGNAMES, generate
from rlhf_jax.models.kv_cache import init_cache

TOL = 1e-4
TIME = 12  # > 2 * WINDOW
ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM",
                 "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}


def max_diff_on_tokens(a, b, mask):
    return float(np.abs(np.asarray(a) - np.asarray(b))[mask.astype(bool)].max())


@pytest.fixture(scope="module")
def loaded(hf_lm):
    """family -> (module, params, jitted forward) loaded from the Hugging Face folders."""
    out = {}
    for family in NEW_FAMILIES:
        module, params = load_pretrained(hf_lm[family][0])
        out[family] = (module, params, jax.jit(module.apply))
    return out


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_configs_read_the_family_layout(family, loaded):
    config = loaded[family][0].config
    assert config.model_type == family and config.sliding_window == WINDOW
    assert SLIDING_ATTENTION in [config.layer_type(i) for i in range(config.num_layers)]
    assert config.qk_norm == (family in ("qwen3", "gemma3_text"))
    gemma = family.startswith("gemma")
    assert (config.sandwich_norms, config.scale_embeddings, config.norm_scale_offset) == (
        (True, True, 1.0) if gemma else (False, False, 0.0))
    if family == "qwen3":
        assert config.dims_per_head == 16 and config.layer_types == (
            "full_attention", "sliding_attention", "sliding_attention")
    if family == "gemma2":
        assert (config.attn_logit_softcap, config.final_logit_softcap) == (2.0, 3.0)
        assert config.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    if family == "gemma3_text":
        assert config.attn_logit_softcap is None and config.final_logit_softcap == 4.0
        assert (config.rope_theta, config.rope_type, config.rope_factor, config.rope_local_theta) == (
            1000.0, "linear", 2.0, 50.0)


@pytest.mark.parametrize("family", NEW_FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_match_transformers_with_padding(family, side, hf_lm, loaded):
    _, torch_model = hf_lm[family]
    module, params, forward = loaded[family]
    ids, mask = padded_batch(seed=11, time=TIME, side=side)
    expected = torch_logits(torch_model, ids, mask)
    ours = forward({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert ours.dtype == jnp.float32 and ours.shape == expected.shape
    assert max_diff_on_tokens(ours, expected, mask) <= TOL
    assert np.abs(expected).max() > 0.5  # the comparison is not between near-zero logits


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_the_window_and_the_soft_caps_change_the_logits(family, loaded):
    """Each family-specific piece matters on these inputs, so parity above is not vacuous."""
    module, params, forward = loaded[family]
    ids, mask = map(jnp.asarray, padded_batch(seed=12, time=TIME))
    logits = forward({"params": params}, ids, mask)
    variants = {"sliding_window": dict(sliding_window=None, layer_types=None)}
    if module.config.attn_logit_softcap is not None:
        variants["attn_logit_softcap"] = dict(attn_logit_softcap=None)
    if module.config.final_logit_softcap is not None:
        variants["final_logit_softcap"] = dict(final_logit_softcap=None)
    if module.config.rope_local_theta is not None:
        variants["rope_local_theta"] = dict(rope_local_theta=None)
    for name, change in variants.items():
        other = type(module)(module.config.replace(**change))
        changed = other.apply({"params": params}, ids, mask)
        assert max_diff_on_tokens(changed, logits, np.asarray(mask)) > 1e-3, name


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_greedy_generation_matches_transformers_generate(family, hf_lm, loaded):
    module, params, _ = loaded[family]
    _, torch_model = hf_lm[family]
    ids, mask = padded_batch(seed=13, batch=4, time=8, side="left")
    new_tokens = 10  # prompt + response spans several windows
    with torch.no_grad():
        expected = torch_model.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
            max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=PAD_ID,
        )[:, ids.shape[1]:].numpy()
    run = jax.jit(generate, static_argnames=GENERATE_STATIC_ARGNAMES)
    out = run(module, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(0),
              max_new_tokens=new_tokens, greedy=True, eos_token_id=None, pad_token_id=PAD_ID)
    tokens = np.asarray(out.tokens)
    np.testing.assert_array_equal(tokens, expected)
    assert len(np.unique(tokens)) > 3  # not a degenerate repetition


@pytest.mark.parametrize("window_slots", [False, True])
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_kv_cache_decoding_past_the_window_matches_full_forward(family, loaded, window_slots):
    """Prefill, a 2-token chunk and single-token steps up to 3 windows: every step's logits
    equal the full pass over the whole left-padded sequence; with `window_slots` (what
    `generate` uses) the sliding layers keep only WINDOW ring slots, the prefill longer than
    them."""
    module, params, forward = loaded[family]
    variables = {"params": params}
    ids, mask = map(jnp.asarray, padded_batch(seed=14, time=TIME, side="left"))
    full = forward(variables, ids, mask)
    cache = init_cache(module.config, ids.shape[0], TIME + 2, window_slots=window_slots)
    sliding = [module.config.layer_type(i) == SLIDING_ATTENTION for i in range(module.config.num_layers)]
    for layer, is_sliding in zip(cache["layers"], sliding):
        slots = layer["window_key"].shape[-1] if window_slots and is_sliding else layer["key"].shape[-1]
        assert slots == (WINDOW if window_slots and is_sliding else TIME + 2)
    assert ("window" in cache) == (window_slots and any(sliding))
    step = jax.jit(lambda v, i, m, c: module.apply(v, i, m, cache=c, method="forward_with_cache"))
    pieces = []
    for start, stop in [(0, 5), (5, 7)] + [(t, t + 1) for t in range(7, TIME)]:
        logits, cache = step(variables, ids[:, start:stop], mask[:, start:stop], cache)
        pieces.append(logits)
    assert int(cache["index"]) == TIME
    np.testing.assert_array_equal(np.asarray(cache["mask"][:, :TIME]), np.asarray(mask))
    assert max_diff_on_tokens(jnp.concatenate(pieces, axis=1), full, np.asarray(mask)) <= TOL


def test_window_follows_positions_not_slots(loaded):
    """A pad in the middle of a row (a gap in the cache) does not shift the window: the row
    gives the same logits as the same tokens without the gap."""
    module, params, forward = loaded["mistral"]
    variables = {"params": params}
    rng = np.random.default_rng(15)
    tokens = rng.integers(3, 128, size=(1, 9))
    gap_ids = np.concatenate([tokens[:, :4], [[PAD_ID, PAD_ID]], tokens[:, 4:]], axis=1)
    gap_mask = np.ones_like(gap_ids)
    gap_mask[:, 4:6] = 0
    dense = forward(variables, jnp.asarray(tokens), jnp.ones_like(jnp.asarray(tokens)))
    gapped = forward(variables, jnp.asarray(gap_ids), jnp.asarray(gap_mask))
    keep = gap_mask[0].astype(bool)
    np.testing.assert_allclose(np.asarray(gapped)[:, keep], np.asarray(dense), atol=1e-5)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_save_pretrained_round_trips_through_transformers(family, loaded, tmp_path):
    module, params, forward = loaded[family]
    save_pretrained(tmp_path, module, params)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["architectures"] == [ARCHITECTURES[family]] and written["sliding_window"] == WINDOW
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded).__name__ == ARCHITECTURES[family]
    ids, mask = padded_batch(seed=16, time=TIME)
    ours = forward({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert max_diff_on_tokens(ours, torch_logits(reloaded, ids, mask), mask) <= TOL
    module_again, params_again = load_pretrained(tmp_path)
    assert module_again.config == module.config
    jax.tree.map(np.testing.assert_array_equal, params, params_again)


def test_shared_prefix_hidden_states_respect_the_window(loaded):
    """Prompts run once through the cache, continuations after them: the same hidden states as
    one pass over each prompt + continuation, with windows shorter than both."""
    module, params, _ = loaded["gemma2"]
    prompt_ids, prompt_mask = padded_batch(seed=17, batch=2, time=7, side="left")
    response_ids = np.random.default_rng(18).integers(3, 128, size=(2, 3, 6))
    response_mask = np.ones_like(response_ids)
    response_mask[:, 1, 4:] = 0
    response_mask[:, 2, 2:] = 0
    response_ids = np.where(response_mask == 1, response_ids, PAD_ID)
    prefix = jax.jit(lambda *a: module.apply({"params": params}, *a, method="shared_prefix_hidden_states"))
    last, hidden = prefix(*map(jnp.asarray, (prompt_ids, prompt_mask, response_ids, response_mask)))
    full = jax.jit(lambda i, m: module.apply({"params": params}, i, m, method="hidden_states"))
    for n in range(3):
        ids = np.concatenate([prompt_ids, response_ids[:, n]], axis=1)
        mask = np.concatenate([prompt_mask, response_mask[:, n]], axis=1)
        expected = np.asarray(full(jnp.asarray(ids), jnp.asarray(mask)))
        np.testing.assert_allclose(last, expected[:, 6], atol=1e-4)
        keep = response_mask[:, n].astype(bool)
        np.testing.assert_allclose(np.asarray(hidden[:, n])[keep], expected[:, 7:][keep], atol=1e-4)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_blockwise_attention_logits_match_transformers(family, hf_lm, loaded):
    """The blockwise attention path (blocks of 5 queries x 5 keys, sequences of 12 with
    windows of 4 and left padding): transformers' logits, as the plain path gives them."""
    _, torch_model = hf_lm[family]
    module, params, _ = loaded[family]
    blockwise = type(module)(module.config.replace(attention_impl="blockwise", attention_block_size=5))
    ids, mask = padded_batch(seed=19, time=TIME, side="left")
    ours = jax.jit(blockwise.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert max_diff_on_tokens(ours, torch_logits(torch_model, ids, mask), mask) <= TOL


def test_blockwise_attention_in_the_shared_prefix_path(loaded):
    """Prompt once through the cache, then the continuations, all through blockwise attention
    (soft-capped GQA with windows, Gemma 2): the plain path's hidden states and gradients."""
    module, params, _ = loaded["gemma2"]
    prompt_ids, prompt_mask = padded_batch(seed=20, batch=2, time=9, side="left")
    response_ids = np.random.default_rng(21).integers(3, 128, size=(2, 2, 7))
    response_mask = np.ones_like(response_ids)
    response_mask[:, 1, 5:] = 0
    args = tuple(map(jnp.asarray, (prompt_ids, prompt_mask, response_ids, response_mask)))
    weights = jnp.asarray(np.random.default_rng(22).normal(size=(2, 2, 7, 32)).astype(np.float32))

    def run(config):
        model = type(module)(config)

        def loss(p):
            last, hidden = model.apply({"params": p}, *args, method="shared_prefix_hidden_states")
            return jnp.sum(hidden * weights * args[3][..., None]) + jnp.sum(last), (last, hidden)

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (_, (last, hidden)), grads = run(module.config.replace(attention_impl="plain"))
    (_, (last_b, hidden_b)), grads_b = run(module.config.replace(attention_impl="blockwise", attention_block_size=4))
    np.testing.assert_allclose(last_b, last, atol=1e-5)
    keep = response_mask.astype(bool)
    np.testing.assert_allclose(np.asarray(hidden_b)[keep], np.asarray(hidden)[keep], atol=1e-5)
    # Gradients to float32 rounding relative to each leaf's scale (they reach ~1e2 here).
    relative = lambda a, b: float(np.abs(a - b).max() / np.abs(b).max())
    assert max(jax.tree.leaves(jax.tree.map(relative, grads_b, grads))) <= 1e-5
