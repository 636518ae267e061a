"""Checkpoint folders: every key and shape checked, errors that name the tensor or file."""
import json
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rlhf_jax.models.checkpoint_io import load_pretrained, read_safetensors, save_pretrained
from rlhf_jax.models.heads import RewardModel, ValueModel
from rlhf_jax.models.transformer import CausalLM


def copy_with_tensors(src, dst, edit):
    """Copy a model folder, letting `edit(tensors)` change its safetensors content."""
    shutil.copytree(src, dst)
    tensors = safetensors.numpy.load_file(dst / "model.safetensors")
    edit(tensors)
    safetensors.numpy.save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_tensor_is_named(hf_lm, tmp_path):
    folder, _ = hf_lm["llama"]
    name = "model.layers.1.self_attn.k_proj.weight"
    bad = copy_with_tensors(folder, tmp_path / "bad", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=f"missing tensor '{name}'"):
        load_pretrained(bad)


@pytest.mark.parametrize("family, name", [
    ("gemma2", "model.layers.2.pre_feedforward_layernorm.weight"),
    ("gemma2", "model.layers.0.post_feedforward_layernorm.weight"),
    ("gemma3_text", "model.layers.1.self_attn.k_norm.weight"),
    ("qwen3", "model.layers.0.self_attn.q_norm.weight"),
])
def test_missing_family_tensor_is_named(family, name, hf_lm, tmp_path):
    folder, _ = hf_lm[family]
    bad = copy_with_tensors(folder, tmp_path / "bad", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=f"missing tensor '{name}'"):
        load_pretrained(bad)


def test_gemma_norms_keep_their_meaning(hf_lm):
    """Gemma's post_attention_layernorm norms the attention output; Llama's is the pre-MLP norm."""
    _, gemma = hf_lm["gemma2"]
    _, params = load_pretrained(hf_lm["gemma2"][0])
    layer = params["decoder"]["layers_1"]
    hf_layer = gemma.model.layers[1]
    for ours, theirs in [("post_attn_norm", "post_attention_layernorm"),
                         ("mlp_norm", "pre_feedforward_layernorm"),
                         ("post_mlp_norm", "post_feedforward_layernorm"), ("attn_norm", "input_layernorm")]:
        np.testing.assert_array_equal(layer[ours]["scale"], getattr(hf_layer, theirs).weight.detach().numpy())
    _, llama_params = load_pretrained(hf_lm["llama"][0])
    assert set(llama_params["decoder"]["layers_0"]) == {"attn_norm", "attn", "mlp_norm", "mlp"}


def test_wrong_shape_is_named(hf_lm, tmp_path):
    folder, _ = hf_lm["qwen2"]
    name = "model.layers.0.self_attn.q_proj.bias"

    def edit(tensors):
        tensors[name] = np.zeros(7, np.float32)

    bad = copy_with_tensors(folder, tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=rf"'{name}' has shape \(7,\) but the config expects \(32,\)"):
        load_pretrained(bad)


def test_unexpected_tensor_is_named(hf_lm, tmp_path):
    folder, _ = hf_lm["gpt2"]

    def edit(tensors):
        tensors["transformer.h.2.ln_1.weight"] = np.ones(32, np.float32)

    bad = copy_with_tensors(folder, tmp_path / "bad", edit)
    with pytest.raises(ValueError, match="unexpected tensor 'transformer.h.2.ln_1.weight'"):
        load_pretrained(bad)


def test_folder_errors_name_the_file(hf_lm, tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_pretrained(tmp_path)
    folder, _ = hf_lm["llama"]
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: invalid JSON"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ValueError, match="'t5' is not supported"):
        load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="`head`"):
        load_pretrained(folder, head="classifier")


def test_ignorable_tensors_are_skipped(hf_lm, tmp_path):
    """Old GPT-2 attention-mask buffers and a duplicate lm_head of a tied model load fine."""
    folder, _ = hf_lm["gpt2"]

    def edit(tensors):
        tensors["transformer.h.0.attn.bias"] = np.ones((1, 1, 64, 64), np.float32)
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"].copy()

    module, params = load_pretrained(copy_with_tensors(folder, tmp_path / "extra", edit))
    _, reference = load_pretrained(folder)
    jax.tree.map(np.testing.assert_array_equal, params, reference)


def test_bfloat16_and_float16_tensors_load_as_float32(hf_lm, tmp_path):
    folder, _ = hf_lm["llama"]
    module, params = load_pretrained(folder)
    save_pretrained(tmp_path / "bf16", module, params, dtype="bfloat16")
    stored = read_safetensors(tmp_path / "bf16" / "model.safetensors")
    assert all(t.dtype == ml_dtypes.bfloat16 for t in stored.values())
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _, params16 = load_pretrained(tmp_path / "bf16")
    for ours, half in zip(jax.tree.leaves(params), jax.tree.leaves(params16)):
        assert half.dtype == np.float32
        np.testing.assert_allclose(half, ours, rtol=1e-2, atol=1e-2)
    # float16 files go through the same reader
    tensors = {k: v.astype(np.float16) for k, v in safetensors.numpy.load_file(folder / "model.safetensors").items()}
    safetensors.numpy.save_file(tensors, tmp_path / "f16.safetensors")
    assert read_safetensors(tmp_path / "f16.safetensors").keys() == tensors.keys()


def test_save_keeps_tokenizer_files_and_config_overrides(hf_lm, tmp_path):
    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, **{f"w{i}": i for i in range(3, 128)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]")
    tokenizer.save_pretrained(tmp_path)
    folder, _ = hf_lm["llama"]
    module, params = load_pretrained(folder)
    save_pretrained(tmp_path, module, params, pad_token_id=0, eos_token_id=2, bos_token_id=None)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["pad_token_id"], config["eos_token_id"], config["bos_token_id"]) == (0, 2, None)
    assert config["architectures"] == ["LlamaForCausalLM"]
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("w5 w7")["input_ids"] == [5, 7]
    assert reloaded.pad_token_id == 0


def test_load_picks_the_head(hf_lm):
    folder, _ = hf_lm["qwen2"]
    lm, _ = load_pretrained(folder)
    value, value_params = load_pretrained(folder, head="value")
    reward, reward_params = load_pretrained(folder, head="reward", rng=jax.random.PRNGKey(3))
    assert isinstance(lm, CausalLM) and isinstance(value, ValueModel) and isinstance(reward, RewardModel)
    assert not np.any(value_params["score"]["kernel"]) and not np.any(value_params["score"]["bias"])
    assert np.std(reward_params["score"]["kernel"]) > 0 and not np.any(reward_params["score"]["bias"])
    jax.tree.map(np.testing.assert_array_equal, value_params["decoder"], reward_params["decoder"])


def test_save_rejects_unknown_modules_and_params(hf_lm, tmp_path):
    folder, _ = hf_lm["llama"]
    module, params = load_pretrained(folder)
    with pytest.raises(ValueError, match="`module`"):
        save_pretrained(tmp_path, object(), params)
    extra = {**params, "adapter": {"kernel": np.zeros((2, 2))}}
    with pytest.raises(ValueError, match="'adapter/kernel' has no Hugging Face name"):
        save_pretrained(tmp_path, module, extra)
    with pytest.raises(ValueError, match="max_shard_size"):
        save_pretrained(tmp_path, module, params, max_shard_size="lots")
