"""ModelConfig: Hugging Face config translation, validation and rotary frequencies."""
import numpy as np
import pytest
from transformers import AutoConfig, GPT2Config, LlamaConfig, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from hf_oracles import hf_config
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.layers import rope_inverse_frequencies


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_from_hf_config_reads_each_family(family):
    hf = hf_config(family).to_dict()
    config = ModelConfig.from_hf_config(hf)
    assert config.model_type == family
    assert config.vocab_size == 128 and config.hidden_size == 32 and config.num_layers == 2
    assert config.num_heads == 4 and config.dims_per_head == 8
    if family == "gpt2":
        assert (config.position_embedding, config.norm_type, config.fused_qkv) == ("learned", "layernorm", True)
        assert config.tie_word_embeddings and config.intermediate_size == 128
        assert config.activation == "gelu_new" and config.kv_heads == 4
    else:
        assert (config.position_embedding, config.norm_type, config.gated_mlp) == ("rope", "rmsnorm", True)
        assert config.kv_heads == 2
        assert config.qkv_bias == (family == "qwen2") and not config.attn_out_bias
        assert config.tie_word_embeddings == (family == "qwen2")
        assert config.rope_theta == (500.0 if family == "llama" else 20000.0)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_to_hf_config_round_trips_through_transformers(family, tmp_path):
    config = ModelConfig.from_hf_config(hf_config(family).to_dict())
    written = config.to_hf_config()
    (tmp_path / "config.json").write_text(__import__("json").dumps(written))
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert reloaded.model_type == family
    assert ModelConfig.from_hf_config(reloaded.to_dict()) == config


def test_legacy_rope_keys_are_read():
    legacy = hf_config("llama").to_dict()
    legacy.pop("rope_parameters")
    legacy.update(rope_theta=1234.0, rope_scaling={"type": "linear", "factor": 3.0})
    config = ModelConfig.from_hf_config(legacy)
    assert (config.rope_theta, config.rope_type, config.rope_factor) == (1234.0, "linear", 3.0)


@pytest.mark.parametrize("rope_type", ["dynamic", "yarn", "longrope"])
def test_unsupported_rope_scaling_names_the_type(rope_type):
    hf = hf_config("llama").to_dict()
    hf["rope_parameters"] = {"rope_type": rope_type, "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match=rope_type):
        ModelConfig.from_hf_config(hf)
    with pytest.raises(ValueError, match=rope_type):
        ModelConfig.llama(rope_type=rope_type)


def test_invalid_configs_raise():
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf_config({"model_type": "bert"})
    with pytest.raises(ValueError, match="sliding"):
        ModelConfig.from_hf_config({**hf_config("qwen2").to_dict(), "use_sliding_window": True})
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig.llama(num_heads=4, num_kv_heads=3, hidden_size=32)
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig.llama(num_heads=5, hidden_size=32)
    with pytest.raises(ValueError, match="dtype"):
        ModelConfig.llama(dtype="float64")


def test_config_is_hashable_for_static_jit_arguments():
    assert hash(ModelConfig.qwen2()) == hash(ModelConfig.qwen2())
    assert ModelConfig.llama(eos_token_id=[2, 3]).eos_token_id == (2, 3)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 500.0},
        {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64, "rope_theta": 500000.0},
    ],
)
def test_rope_frequencies_match_transformers(rope):
    hf = LlamaConfig(hidden_size=128, num_attention_heads=2, rope_parameters=rope)
    expected = LlamaRotaryEmbedding(config=hf).inv_freq.numpy()
    ours = rope_inverse_frequencies(ModelConfig.from_hf_config(hf.to_dict()))
    np.testing.assert_allclose(ours, expected, rtol=1e-6)
    if rope["rope_type"] != "default":  # the scaling changes something
        plain = rope_inverse_frequencies(ModelConfig.llama(hidden_size=128, num_heads=2,
                                                           rope_theta=rope["rope_theta"]))
        assert not np.allclose(ours, plain)


def test_family_presets_match_transformers_defaults():
    gpt2 = ModelConfig.gpt2()
    assert ModelConfig.from_hf_config(GPT2Config().to_dict()).replace(
        bos_token_id=None, eos_token_id=None) == gpt2
    qwen = ModelConfig.from_hf_config(Qwen2Config(tie_word_embeddings=False).to_dict())
    assert qwen.qkv_bias and not qwen.attn_out_bias
