"""`Decoder(output_positions=)`: the last layer's queries and MLP at a few positions only give
the same hidden states and gradients as the full forward pass read at those positions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.heads import RewardModel
from rlhf_jax.models.kv_cache import init_cache
from rlhf_jax.models.transformer import CausalLM

SMALL = dict(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48)
CONFIGS = {
    "llama-gqa": ModelConfig.llama(num_kv_heads=2, **SMALL),
    "gpt2": ModelConfig.gpt2(max_position_embeddings=16, **SMALL),  # fused qkv, learned positions
    "gemma2": ModelConfig.gemma2(num_kv_heads=2, head_dim=8, sliding_window=3, **SMALL),  # window, caps
    "qwen3-remat": ModelConfig.qwen3(num_kv_heads=2, head_dim=8, remat=True, **SMALL),  # q/k norm
    "llama-blockwise": ModelConfig.llama(num_kv_heads=2, attention_impl="blockwise", attention_block_size=2,
                                         **SMALL),
}


def left_padded(seed, rows=3, length=7):
    rng = np.random.default_rng(seed)
    lengths = np.array([length, 4, 1])[:rows]
    ids = rng.integers(1, SMALL["vocab_size"], (rows, length)).astype(np.int32)
    mask = (np.arange(length)[None] >= length - lengths[:, None]).astype(np.int32)
    return jnp.asarray(ids * mask), jnp.asarray(mask)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_output_positions_read_the_full_forward_pass(name):
    model = CausalLM(CONFIGS[name])
    ids, mask = left_padded(0)
    params = model.init(jax.random.key(1), ids)["params"]
    rows = jnp.asarray([[6, 2, 5], [0, 6, 6], [3, 4, 6]], jnp.int32)  # any positions, repeats allowed
    hidden = lambda p, **kw: model.apply({"params": p}, ids, mask, method="hidden_states", **kw)
    full = jax.jit(hidden)(params)
    picked = jax.jit(lambda p: hidden(p, output_positions=rows))(params)
    assert picked.shape == (3, 3, CONFIGS[name].hidden_size)
    np.testing.assert_allclose(picked, np.take_along_axis(np.asarray(full), np.asarray(rows)[..., None], 1),
                               atol=1e-5, rtol=1e-5)
    weights = jax.random.normal(jax.random.key(2), picked.shape)
    grad_full = jax.jit(jax.grad(lambda p: jnp.sum(weights * jnp.take_along_axis(hidden(p), rows[..., None], 1))))(params)
    grad_picked = jax.jit(jax.grad(lambda p: jnp.sum(weights * hidden(p, output_positions=rows))))(params)
    for a, b in zip(jax.tree.leaves(grad_full), jax.tree.leaves(grad_picked)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_output_positions_with_a_cache_still_write_every_key():
    """The prefill cache of a pass read at one position holds every token's keys and values."""
    config = CONFIGS["llama-gqa"]
    model = CausalLM(config)
    ids, mask = left_padded(3)
    params = model.init(jax.random.key(4), ids)["params"]
    run = jax.jit(lambda positions=None: model.apply({"params": params}, ids, mask, cache=init_cache(config, 3, 9),
                                                     method="hidden_states", output_positions=positions))
    full, full_cache = run()
    last, last_cache = run(jnp.full((3, 1), 6, jnp.int32))
    np.testing.assert_allclose(last[:, 0], full[:, 6], atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(full_cache), jax.tree.leaves(last_cache)):
        np.testing.assert_array_equal(a, b)


def test_reward_model_reads_its_score_at_the_last_token_only():
    config = CONFIGS["llama-gqa"]
    module = RewardModel(config)
    ids, mask = left_padded(5)
    right = jnp.asarray([[3, 7, 9, 2, 0, 0, 0]], jnp.int32), jnp.asarray([[1, 1, 1, 1, 0, 0, 0]], jnp.int32)
    params = module.init(jax.random.key(6), ids)["params"]
    for tokens, real in ((ids, mask), right):
        hidden = module.apply({"params": params}, tokens, real, method="hidden_states")
        last = np.asarray(real).shape[1] - 1 - np.argmax(np.asarray(real)[:, ::-1], axis=1)
        expected = module.apply({"params": params}, hidden[np.arange(len(last)), last], method="scores_from_hidden")
        np.testing.assert_allclose(module.apply({"params": params}, tokens, real), expected, atol=1e-5, rtol=1e-5)


def test_output_positions_must_be_a_matrix():
    model = CausalLM(CONFIGS["llama-gqa"])
    ids, mask = left_padded(0)
    params = model.init(jax.random.key(1), ids)["params"]
    with pytest.raises(ValueError, match="output_positions"):
        model.apply({"params": params}, ids, mask, method="hidden_states", output_positions=jnp.zeros(3, jnp.int32))
