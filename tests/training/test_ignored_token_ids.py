"""Ids at padded positions are never read: an ignore index of -100 there (prompt or response,
full model or LoRA, either prompt path) gives the same log-probs and gradients as pad id 0;
an out-of-range id at a real position is refused when the arrays are concrete."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models.lora import LoRAConfig, LoRAModel, init_adapters
from rlhf_jax.models.transformer import CausalLM
from rlhf_jax.training.logprobs import LMBatch, response_logprobs
from test_response_logprobs import CONFIGS, VOCAB, random_batch

IGNORE = -100


def with_ignored_padding(batch: LMBatch) -> LMBatch:
    """The batch with -100 at every padded prompt and response position."""
    return LMBatch(np.where(batch.prompt_mask != 0, batch.prompt_ids, IGNORE), batch.prompt_mask,
                   np.where(batch.response_mask != 0, batch.response_ids, IGNORE), batch.response_mask)


def with_zero_padding(batch: LMBatch) -> LMBatch:
    return LMBatch(batch.prompt_ids * batch.prompt_mask, batch.prompt_mask,
                   batch.response_ids * batch.response_mask, batch.response_mask)


def model_and_params(family, lora):
    module = CausalLM(CONFIGS[family])
    params = module.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    if not lora:
        return module.apply, params
    config = LoRAConfig(rank=2, targets=("q_proj", "v_proj", "qkv_proj", "down_proj", "fc_out"))
    adapters = jax.tree.map(lambda x: x + 0.1, init_adapters(params, config, jax.random.key(1)))  # B != 0
    return LoRAModel(module, config).apply, {"base": params, "lora": adapters}


@pytest.mark.parametrize("family, lora", [("llama", False), ("gpt2", True)])
def test_ignore_index_at_padding_changes_nothing(family, lora):
    apply_fn, params = model_and_params(family, lora)
    batch = random_batch(seed=3, num=2)
    assert (batch.prompt_mask == 0).any() and (batch.response_mask == 0).any()
    weights = jax.random.normal(jax.random.key(2), batch.response_ids.shape)

    @jax.jit
    def outputs(p, b):
        """Gradients through the shared-prompt path, log-probs of both prompt paths."""
        logprobs = lambda p, once: response_logprobs(apply_fn, p, b, prompt_once=once).logprobs
        grads = jax.grad(lambda p: jnp.sum(weights * logprobs(p, True)))(p)
        return grads, logprobs(p, True), logprobs(p, False)

    got, want = outputs(params, with_ignored_padding(batch)), outputs(params, with_zero_padding(batch))
    for name, x, y in zip(("grads", "shared prompt", "prompt per response"), got, want):
        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
            assert np.all(np.isfinite(a)), name
            np.testing.assert_allclose(a, b, atol=1e-6, err_msg=name)


def test_negative_id_at_a_real_position_is_refused():
    apply_fn, params = model_and_params("llama", lora=True)
    batch = random_batch(seed=3, num=2)
    ids = batch.response_ids.copy()
    mask = batch.response_mask.copy()
    ids[1, 0, 0], mask[1, 0, 0] = IGNORE, 1  # an ignore index where the mask says "real"
    bad = LMBatch(batch.prompt_ids, batch.prompt_mask, ids, mask)
    with pytest.raises(ValueError, match=r"`response_ids` holds token id -100 at index \[1, 0, 0\], a real "
                                         r"position .*Mark ignored tokens \(e.g. -100\) with mask 0"):
        response_logprobs(apply_fn, params, bad)


def test_out_of_vocabulary_id_at_a_real_position_is_refused():
    module = CausalLM(CONFIGS["gpt2"])
    params = module.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    ids, mask = np.array([[IGNORE, 5, 7]]), np.array([[0, 1, 1]])
    assert np.all(np.isfinite(module.apply({"params": params}, ids, mask)))  # -100 on padding: fine
    with pytest.raises(ValueError, match=rf"`input_ids` holds token id {VOCAB} at index \[0, 2\], .* \[0, {VOCAB}\)"):
        module.apply({"params": params}, np.array([[IGNORE, 5, VOCAB]]), mask)
