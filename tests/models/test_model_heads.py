"""Value and reward heads: init, last-token read-out, *ForSequenceClassification round trips."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification, Gemma3TextForSequenceClassification,
    GPT2ForSequenceClassification, LlamaForSequenceClassification, Qwen3ForSequenceClassification,
)

from hf_oracles import build_hf_model, padded_batch
from rlhf_jax.models.checkpoint_io import load_pretrained, save_pretrained
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.heads import RewardModel, ScalarHead, ValueModel

TINY = ModelConfig.llama(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, intermediate_size=64)
REWARD_MODEL = RewardModel(TINY)
# Shared compiled functions: every test below reuses one program per shape.
reward_init = jax.jit(REWARD_MODEL.init)
reward_forward = jax.jit(REWARD_MODEL.apply)
reward_hidden = jax.jit(partial(REWARD_MODEL.apply, method="hidden_states"))
reward_token_scores = jax.jit(partial(REWARD_MODEL.apply, method="token_scores"))
CLASSIFIERS = {"llama": LlamaForSequenceClassification, "gpt2": GPT2ForSequenceClassification,
               "qwen3": Qwen3ForSequenceClassification,
               "gemma3_text": Gemma3TextForSequenceClassification}


def torch_scores(model, ids, mask):
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions))
    return out.logits[:, 0].numpy()


def test_value_head_is_zero_at_init_and_trainable():
    model = ValueModel(TINY)
    ids, mask = map(jnp.asarray, padded_batch(seed=0))
    params = jax.jit(model.init)(jax.random.PRNGKey(0), ids, mask)["params"]
    assert not np.any(params["score"]["kernel"]) and not np.any(params["score"]["bias"])
    values = jax.jit(model.apply)({"params": params}, ids, mask)
    assert values.shape == ids.shape and values.dtype == jnp.float32
    assert not np.any(values)

    def loss(p):  # pushing values towards 1 must move the head kernel
        return jnp.sum((model.apply({"params": p}, ids, mask) - 1.0) ** 2 * mask)

    grads = jax.jit(jax.grad(loss))(params)
    assert np.abs(grads["score"]["kernel"]).max() > 0 and grads["score"]["bias"][0] < 0


def test_reward_head_init_statistics():
    hidden_size = 4096
    head = ScalarHead(kernel_std=1.0 / np.sqrt(hidden_size + 1))
    params = jax.jit(head.init)(jax.random.PRNGKey(1), jnp.zeros((1, hidden_size)))["params"]
    std = float(np.std(params["kernel"]))
    assert abs(std * np.sqrt(hidden_size + 1) - 1.0) < 0.05
    assert not np.any(params["bias"])
    reward_params = reward_init(jax.random.PRNGKey(2), jnp.ones((1, 3), jnp.int32))["params"]
    assert np.std(reward_params["score"]["kernel"]) > 0.05  # 1/sqrt(33) ~ 0.17


@pytest.mark.parametrize("side", ["left", "right"])
def test_reward_reads_the_last_non_pad_token(side):
    ids, mask = padded_batch(seed=3, side=side)
    params = reward_init(jax.random.PRNGKey(4), jnp.ones((1, 3), jnp.int32))["params"]
    params["score"]["bias"] = jnp.array([0.25])
    variables = {"params": params}
    rewards = reward_forward(variables, jnp.asarray(ids), jnp.asarray(mask))
    hidden = np.asarray(reward_hidden(variables, jnp.asarray(ids), jnp.asarray(mask)), dtype=np.float64)
    kernel, bias = np.asarray(params["score"]["kernel"], np.float64), 0.25
    for row in range(ids.shape[0]):
        last = np.nonzero(mask[row])[0].max()
        expected = hidden[row, last] @ kernel[:, 0] + bias
        np.testing.assert_allclose(rewards[row], expected, rtol=1e-5, atol=1e-6)
    token_scores = reward_token_scores(variables, jnp.asarray(ids), jnp.asarray(mask))
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
    np.testing.assert_allclose(np.asarray(token_scores)[np.arange(len(last)), last], rewards, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3", "gemma3_text"])
def test_sequence_classification_round_trip_keeps_the_trained_head(family, tmp_path):
    hf_model = build_hf_model(family, tmp_path / "hf", seed=11, model_class=CLASSIFIERS[family], num_labels=1)
    module, params = load_pretrained(tmp_path / "hf")  # architecture says ForSequenceClassification
    assert isinstance(module, RewardModel)
    np.testing.assert_allclose(params["score"]["kernel"][:, 0], hf_model.score.weight[0].detach().numpy(), rtol=1e-6)
    ids, mask = padded_batch(seed=12, side="right")
    forward = jax.jit(module.apply)
    ours = forward({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(ours, torch_scores(hf_model, ids, mask), atol=1e-4)

    # "Train" the head, save it, and read it back with transformers and with ours.
    trained = dict(params, score={"kernel": params["score"]["kernel"] * -2.0 + 0.1,
                                  "bias": jnp.zeros((1,))})
    save_pretrained(tmp_path / "ours", module, trained, pad_token_id=0)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours").eval()
    assert type(reloaded) is CLASSIFIERS[family]
    trained_scores = forward({"params": trained}, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(torch_scores(reloaded, ids, mask), trained_scores, atol=1e-4)
    assert np.abs(np.asarray(trained_scores - ours)).max() > 1e-2
    _, again = load_pretrained(tmp_path / "ours")
    jax.tree.map(np.testing.assert_array_equal, again, trained)


def test_nonzero_reward_bias_survives_our_round_trip(tmp_path):
    params = reward_init(jax.random.PRNGKey(5), jnp.ones((1, 3), jnp.int32))["params"]
    params["score"]["bias"] = jnp.array([0.5])
    save_pretrained(tmp_path, REWARD_MODEL, params)
    _, again = load_pretrained(tmp_path)
    np.testing.assert_array_equal(again["score"]["bias"], [0.5])
    value_model, value_params = load_pretrained(tmp_path, head="value")  # value from a reward model
    assert isinstance(value_model, ValueModel) and not np.any(value_params["score"]["kernel"])
    jax.tree.map(np.testing.assert_array_equal, value_params["decoder"], params["decoder"])
