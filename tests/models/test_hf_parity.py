"""Logits parity with transformers + torch (CPU, float32) and save/load round trips."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import AutoModelForCausalLM

from hf_oracles import build_hf_model, padded_batch, torch_logits
from rlhf_jax.models.checkpoint_io import load_pretrained, save_pretrained
from rlhf_jax.models.kv_cache import init_cache

FAMILIES = ["gpt2", "llama", "qwen2"]
TOL = 1e-4


def max_diff_on_tokens(a, b, mask):
    return float(np.abs(np.asarray(a) - np.asarray(b))[mask.astype(bool)].max())


@pytest.fixture(scope="module")
def loaded(hf_lm):
    """family -> (module, params, jitted forward) loaded from the Hugging Face folders."""
    out = {}
    for family, (folder, _) in hf_lm.items():
        module, params = load_pretrained(folder)
        out[family] = (module, params, jax.jit(module.apply))
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_match_transformers_with_padding(family, side, hf_lm, loaded):
    _, torch_model = hf_lm[family]
    module, params, forward = loaded[family]
    ids, mask = padded_batch(seed=1, side=side)
    expected = torch_logits(torch_model, ids, mask)
    ours = forward({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert ours.dtype == jnp.float32 and ours.shape == expected.shape
    assert max_diff_on_tokens(ours, expected, mask) <= TOL
    assert np.abs(expected).max() > 0.5  # the comparison is not between near-zero logits


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_round_trips_through_transformers(family, loaded, tmp_path):
    module, params, forward = loaded[family]
    save_pretrained(tmp_path, module, params)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                                       "qwen2": "Qwen2ForCausalLM"}[family]
    ids, mask = padded_batch(seed=2)
    ours = forward({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert max_diff_on_tokens(ours, torch_logits(reloaded, ids, mask), mask) <= TOL
    # ... and back into ours: identical parameters.
    _, params_again = load_pretrained(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, params, params_again)


def test_sharded_checkpoint_round_trip(loaded, tmp_path):
    module, params, forward = loaded["llama"]
    save_pretrained(tmp_path, module, params, max_shard_size="20KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    assert not (tmp_path / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = padded_batch(seed=3)
    ours = forward({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert max_diff_on_tokens(ours, torch_logits(reloaded, ids, mask), mask) <= TOL
    _, params_again = load_pretrained(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, params, params_again)
    # A later unsharded save into the same folder replaces the shards.
    save_pretrained(tmp_path, module, params)
    assert not list(tmp_path.glob("model-*.safetensors"))


@pytest.mark.parametrize(
    "rope",
    [{"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 16, "rope_theta": 50000.0}],
    ids=["linear", "llama3"],
)
def test_scaled_rope_logits_match_transformers(rope, tmp_path):
    torch_model = build_hf_model("llama", tmp_path, seed=5, rope_parameters=rope)
    module, params = load_pretrained(tmp_path)
    assert module.config.rope_type == rope["rope_type"]
    ids, mask = padded_batch(seed=4, time=24)
    ours = jax.jit(module.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert max_diff_on_tokens(ours, torch_logits(torch_model, ids, mask), mask) <= TOL


def test_forward_api_pieces_agree(loaded):
    module, params, forward = loaded["llama"]
    variables = {"params": params}
    ids, mask = map(jnp.asarray, padded_batch(seed=6))

    @jax.jit
    def pieces(variables, ids, mask, position_ids):
        logits2 = module.apply(variables, ids, mask)
        hidden = hidden2 = module.apply(variables, ids, mask, method="hidden_states")
        from_hidden = module.apply(variables, hidden2, method="lm_logits")
        # lm_logits on a slice (the positions a loss reads) is the same projection.
        subset = module.apply(variables, hidden2[:, -3:], method="lm_logits")
        explicit = module.apply(variables, ids, mask, position_ids=position_ids)
        shifted = module.apply(variables, ids, mask, position_ids=position_ids + 3)
        stretched = module.apply(variables, ids, mask, position_ids=position_ids * 2)
        return logits2, hidden, from_hidden, subset, explicit, shifted, stretched

    logits = forward(variables, ids, mask)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    logits2, hidden, from_hidden, subset, explicit, shifted, stretched = pieces(
        variables, ids, mask, positions)
    assert hidden.shape == (*ids.shape, module.config.hidden_size)
    for other in (logits2, from_hidden, explicit):
        np.testing.assert_allclose(other, logits, atol=1e-5)
    np.testing.assert_allclose(subset, logits[:, -3:], atol=1e-5)
    # RoPE sees relative positions only: a common shift changes nothing, a stretch does.
    np.testing.assert_allclose(shifted, logits, atol=1e-4)
    assert np.abs(np.asarray(stretched - logits)).max() > 1e-2


def test_call_returns_logits_only(loaded):
    module, params, _ = loaded["gpt2"]
    ids, mask = map(jnp.asarray, padded_batch(seed=9))
    cache = init_cache(module.config, ids.shape[0], ids.shape[1])
    with pytest.raises(TypeError, match="cache"):
        module.apply({"params": params}, ids, mask, cache=cache)
    with pytest.raises(TypeError, match="return_hidden"):
        module.apply({"params": params}, ids, mask, return_hidden=True)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kv_cache_steps_match_full_forward(family, loaded):
    module, params, forward = loaded[family]
    variables = {"params": params}
    ids, mask = map(jnp.asarray, padded_batch(seed=7, time=10))
    full = forward(variables, ids, mask)
    cache = init_cache(module.config, ids.shape[0], 12)
    step = jax.jit(lambda v, i, m, c: module.apply(v, i, m, cache=c, method="forward_with_cache"))
    chunk_logits, cache = step(variables, ids[:, :6], mask[:, :6], cache)
    pieces = [chunk_logits]
    for t in range(6, 10):
        logits_t, cache = step(variables, ids[:, t:t + 1], mask[:, t:t + 1], cache)
        pieces.append(logits_t)
    assert int(cache["index"]) == 10
    np.testing.assert_array_equal(np.asarray(cache["mask"][:, :10]), np.asarray(mask))
    assert max_diff_on_tokens(jnp.concatenate(pieces, axis=1), full, np.asarray(mask)) <= TOL


def test_bfloat16_compute_keeps_float32_logits(hf_lm, loaded):
    folder, _ = hf_lm["qwen2"]
    module16, params16 = load_pretrained(folder, dtype="bfloat16")
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params16))
    _, params, forward = loaded["qwen2"]
    ids, mask = map(jnp.asarray, padded_batch(seed=8))
    logits16, hidden16 = jax.jit(lambda v, i, m: (module16.apply(v, i, m),
                                                  module16.apply(v, i, m, method="hidden_states")))(
        {"params": params16}, ids, mask)
    assert logits16.dtype == jnp.float32 and hidden16.dtype == jnp.bfloat16
    error = max_diff_on_tokens(logits16, forward({"params": params}, ids, mask), np.asarray(mask))
    assert 0 < error < 0.15


def test_remat_gives_same_values_and_gradients(hf_lm, loaded):
    folder, _ = hf_lm["llama"]
    module_remat, params = load_pretrained(folder, remat=True)
    module, _, _ = loaded["llama"]
    ids, mask = map(jnp.asarray, padded_batch(seed=9))

    def loss(p, m):
        logp = jax.nn.log_softmax(m.apply({"params": p}, ids, mask), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1))

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    value, grads = value_and_grad(params, module)
    value_remat, grads_remat = value_and_grad(params, module_remat)
    np.testing.assert_allclose(value_remat, value, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads_remat, grads)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(grads))


def test_jit_and_eager_forward_agree(loaded):
    module, params, forward = loaded["gpt2"]
    ids, mask = map(jnp.asarray, padded_batch(seed=10))
    eager = module.apply({"params": params}, ids, mask)  # op by op, no jit
    np.testing.assert_allclose(eager, forward({"params": params}, ids, mask), atol=1e-5)
