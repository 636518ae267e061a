"""The prompt-once forward (`shared_prefix_hidden_states`) on the blockwise attention path
(`ops.blockwise_prefix_attention`, blocks of 3 queries x 3 keys) against a full forward pass
of every prompt + response: hidden states and parameter gradients, on a tiny Gemma 2 layout
(soft-capped grouped-query attention, alternating sliding-window and global layers) with
left-padded prompts and right-padded responses."""
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import CausalLM

CONFIG = ModelConfig.gemma2(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                            intermediate_size=48, query_pre_attn_scalar=8, attn_logit_softcap=2.0,
                            sliding_window=3, max_position_embeddings=64)
ROWS, PROMPT, NUM, RESPONSE, WIDTH = 2, 8, 3, 5, 32


def batch():
    """Prompts of 8 and 3 real tokens (left-padded), responses of 5, 3, 1 / 2, 5, 0 tokens."""
    rng = np.random.default_rng(0)
    prompt_ids = rng.integers(3, 64, (ROWS, PROMPT)).astype(np.int32)
    prompt_mask = (np.arange(PROMPT)[None] >= np.array([[0], [5]])).astype(np.int32)
    response_ids = rng.integers(3, 64, (ROWS, NUM, RESPONSE)).astype(np.int32)
    lengths = np.array([[5, 3, 1], [2, 5, 0]])
    response_mask = (np.arange(RESPONSE)[None, None] < lengths[..., None]).astype(np.int32)
    return prompt_ids * prompt_mask, prompt_mask, response_ids * response_mask, response_mask


def test_blockwise_shared_prefix_equals_full_forward_per_response():
    prompt_ids, prompt_mask, response_ids, response_mask = batch()
    shared = CausalLM(CONFIG.replace(attention_impl="blockwise", attention_block_size=3))
    full = CausalLM(CONFIG.replace(attention_impl="plain"))
    params = full.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(ROWS, NUM, RESPONSE, WIDTH)).astype(np.float32))
    keep = jnp.asarray(response_mask[..., None], jnp.float32)

    def shared_loss(p):
        last, hidden = shared.apply({"params": p}, prompt_ids, prompt_mask, response_ids, response_mask,
                                    method="shared_prefix_hidden_states")
        return jnp.sum(hidden * weights * keep) + jnp.sum(last), (last, hidden)

    # Every prompt + response as one row [B * N, P + R] (the prompt repeated per response).
    ids = np.concatenate([np.repeat(prompt_ids, NUM, 0), response_ids.reshape(ROWS * NUM, RESPONSE)], 1)
    mask = np.concatenate([np.repeat(prompt_mask, NUM, 0), response_mask.reshape(ROWS * NUM, RESPONSE)], 1)

    def full_loss(p):
        hidden = full.apply({"params": p}, jnp.asarray(ids), jnp.asarray(mask), method="hidden_states")
        last = hidden[::NUM, PROMPT - 1]
        hidden = hidden[:, PROMPT:].reshape(ROWS, NUM, RESPONSE, WIDTH)
        return jnp.sum(hidden * weights * keep) + jnp.sum(last), (last, hidden)

    (_, (last, hidden)), grads = jax.jit(jax.value_and_grad(shared_loss, has_aux=True))(params)
    (_, (last_full, hidden_full)), grads_full = jax.jit(jax.value_and_grad(full_loss, has_aux=True))(params)
    np.testing.assert_allclose(np.asarray(last), np.asarray(last_full), atol=2e-5, rtol=2e-5)
    real = response_mask.astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[real], np.asarray(hidden_full)[real], atol=2e-5, rtol=2e-5)
    relative = lambda a, b: float(np.abs(a - b).max() / np.abs(b).max())
    assert max(jax.tree.leaves(jax.tree.map(relative, grads, grads_full))) <= 1e-5

    # The last layer computed at each response's last token only (query rows).
    positions = np.maximum(response_mask.sum(-1) - 1, 0)[..., None]  # [B, N, 1]
    _, at_last = jax.jit(lambda p: shared.apply({"params": p}, prompt_ids, prompt_mask, response_ids, response_mask,
                                                positions, method="shared_prefix_hidden_states"))(params)
    expected = np.take_along_axis(np.asarray(hidden_full), positions[..., None], axis=2)
    np.testing.assert_allclose(np.asarray(at_last)[real.any(-1)], expected[real.any(-1)], atol=2e-5, rtol=2e-5)
