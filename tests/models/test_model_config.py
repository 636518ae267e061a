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


@pytest.mark.parametrize("family", ["qwen3", "mistral", "gemma2", "gemma3_text"])
def test_new_family_configs_round_trip_through_transformers(family, tmp_path):
    config = ModelConfig.from_hf_config(hf_config(family).to_dict())
    (tmp_path / "config.json").write_text(__import__("json").dumps(config.to_hf_config()))
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert reloaded.model_type == family
    assert ModelConfig.from_hf_config(reloaded.to_dict()) == config
    assert hash(config) == hash(ModelConfig.from_hf_config(reloaded.to_dict()))
    hf_types = list(getattr(reloaded, "layer_types", None) or [])
    ours = [config.layer_type(i) for i in range(config.num_layers)]
    if family != "mistral":  # Mistral has no layer_types: its window covers every layer
        assert hf_types == ours


def test_new_family_presets_match_transformers_defaults():
    from transformers import Gemma2Config, Gemma3TextConfig, MistralConfig, Qwen3Config
    assert ModelConfig.from_hf_config(Gemma2Config().to_dict()) == ModelConfig.gemma2()
    assert ModelConfig.from_hf_config(Gemma3TextConfig().to_dict()) == ModelConfig.gemma3_text()
    mistral = ModelConfig.from_hf_config(MistralConfig().to_dict())
    assert mistral == ModelConfig.mistral(max_position_embeddings=mistral.max_position_embeddings)
    qwen3 = ModelConfig.from_hf_config(Qwen3Config(use_sliding_window=False).to_dict())
    assert qwen3.qk_norm and qwen3.layer_types is None and not qwen3.qkv_bias
    assert ModelConfig.qwen3().qk_norm and ModelConfig.qwen3().dims_per_head == 128
    gemma3 = ModelConfig.gemma3_text()
    assert [gemma3.layer_type(i) for i in range(6)] == ["sliding_attention"] * 5 + ["full_attention"]
    assert gemma3.rope("sliding_attention").theta == 1e4 and gemma3.rope("full_attention").theta == 1e6


def test_legacy_gemma3_rope_keys_are_read():
    """transformers 4 wrote rope_theta + rope_scaling (global layers) and rope_local_base_freq."""
    legacy = hf_config("gemma3_text").to_dict()
    legacy.pop("rope_parameters")
    legacy.update(rope_theta=3e5, rope_local_base_freq=77.0, rope_scaling={"rope_type": "linear", "factor": 8.0})
    config = ModelConfig.from_hf_config(legacy)
    assert (config.rope_theta, config.rope_type, config.rope_factor, config.rope_local_theta) == (
        3e5, "linear", 8.0, 77.0)
    legacy.pop("layer_types")  # then the period comes from sliding_window_pattern
    config = ModelConfig.from_hf_config({**legacy, "sliding_window_pattern": 2})
    assert config.layer_types == ("sliding_attention", "full_attention") * 2


def test_gemma3_rope_frequencies_per_layer_type_match_transformers():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
    hf = hf_config("gemma3_text")
    rotary = Gemma3RotaryEmbedding(hf)
    config = ModelConfig.from_hf_config(hf.to_dict())
    for layer_type in ("sliding_attention", "full_attention"):
        expected = getattr(rotary, f"{layer_type}_inv_freq").numpy()
        np.testing.assert_allclose(rope_inverse_frequencies(config, layer_type), expected, rtol=1e-6)
    assert not np.allclose(rope_inverse_frequencies(config, "sliding_attention"),
                           rope_inverse_frequencies(config, "full_attention"))


@pytest.mark.parametrize(
    "family, change, key",
    [
        ("gemma3_text", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
        ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ("llama", {"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
        ("qwen3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
        ("llama", {"sliding_window": 8}, "sliding_window"),
        ("qwen3", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "yarn"),
        ("gemma3_text", {"rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}},
         "rope_parameters.sliding_attention"),
        ("gemma3_text", {"rope_parameters": {
            "full_attention": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
         "rope_parameters.full_attention rope scaling type 'dynamic'"),
        ("qwen3", {"use_sliding_window": False,
                   "layer_types": ["full_attention", "sliding_attention", "full_attention"]},
         "use_sliding_window"),
        ("gemma2", {"sliding_window": None}, "sliding_window"),
        ("mistral", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ],
)
def test_unsupported_hf_settings_are_refused_with_the_key(family, change, key):
    hf = {**hf_config(family).to_dict(), **change}
    with pytest.raises(ValueError, match=key):
        ModelConfig.from_hf_config(hf)


@pytest.mark.parametrize(
    "config, key",
    [
        (lambda: ModelConfig.llama(sliding_window=8), "sliding_window"),
        (lambda: ModelConfig.qwen3(attn_logit_softcap=50.0), "attn_logit_softcap"),
        (lambda: ModelConfig.gemma3_text(attn_logit_softcap=50.0), "attn_logit_softcap"),
        (lambda: ModelConfig.gemma2(qk_norm=True), "qk_norm"),
        (lambda: ModelConfig.qwen3(qk_norm=False), "qk_norm"),
        (lambda: ModelConfig.gemma2(rope_local_theta=1e4), "rope_local_theta"),
        (lambda: ModelConfig.mistral(num_layers=2, layer_types=("full_attention", "sliding_attention")),
         "layer_types"),
        (lambda: ModelConfig.mistral(qkv_bias=True, attn_out_bias=True), "attention biases"),
        (lambda: ModelConfig.qwen3(mlp_bias=True), "mlp_bias"),
    ],
)
def test_settings_a_family_cannot_write_are_refused(config, key):
    with pytest.raises(ValueError, match=key):
        config().to_hf_config()


def test_invalid_attention_spans_raise():
    with pytest.raises(ValueError, match="layer_types"):
        ModelConfig.llama(num_layers=3, sliding_window=4, layer_types=("full_attention",) * 2)
    with pytest.raises(ValueError, match="layer_types"):
        ModelConfig.llama(num_layers=1, sliding_window=4, layer_types=("local",))
    with pytest.raises(ValueError, match="sliding_window"):
        ModelConfig.llama(num_layers=1, layer_types=("sliding_attention",))
    with pytest.raises(ValueError, match="sliding_window"):
        ModelConfig.llama(sliding_window=0)
    with pytest.raises(ValueError, match="final_logit_softcap"):
        ModelConfig.gemma2(final_logit_softcap=0.0)
    # a window alone slides every layer (Mistral); no sliding layer leaves layer_types None
    assert ModelConfig.llama(num_layers=2, sliding_window=4).layer_types == ("sliding_attention",) * 2
    assert ModelConfig.llama(num_layers=2, layer_types=["full_attention"] * 2).layer_types is None


def test_attention_impl_choice_and_validation():
    auto = ModelConfig(attention_block_size=512)
    assert not auto.uses_blockwise_attention(1, 100_000)  # a decode step stays plain
    assert not auto.uses_blockwise_attention(512, 512)  # one block of scores: plain
    assert auto.uses_blockwise_attention(513, 513) and auto.uses_blockwise_attention(256, 2048)
    assert ModelConfig(attention_impl="blockwise").uses_blockwise_attention(1, 4)
    assert not ModelConfig(attention_impl="plain").uses_blockwise_attention(10_000, 10_000)
    with pytest.raises(ValueError, match="attention_impl"):
        ModelConfig(attention_impl="flash")
    with pytest.raises(ValueError, match="attention_block_size"):
        ModelConfig(attention_block_size=0)
