"""LoRA forward (NumPy oracle), merging, and PEFT folders in both directions against `peft`."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from hf_oracles import padded_batch, torch_logits
from rlhf_jax.models.checkpoint_io import load_pretrained
from rlhf_jax.models.layers import Dense
from rlhf_jax.models.lora import LoRAConfig, LoRAModel, init_adapters, merge_adapters
from rlhf_jax.models.peft_io import load_peft_adapter, save_peft_adapter


class TwoLayers(nn.Module):
    """x -> relu(q_proj(x)) -> o_proj: two `Dense`s named like attention projections."""

    @nn.compact
    def __call__(self, x):
        hidden = jax.nn.relu(Dense(6, True, name="q_proj")(x))
        return Dense(3, False, name="o_proj")(hidden)


def random_adapters(params, config, seed):
    """Adapters with nonzero B (a fresh adapter is the identity)."""
    adapters = init_adapters(params, config, jax.random.key(seed))
    return jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(seed + 1), x.shape), adapters)


def test_lora_forward_matches_numpy_oracle():
    module = TwoLayers()
    x = np.random.default_rng(0).normal(size=(2, 5, 4)).astype(np.float32)
    params = module.init(jax.random.key(0), x)["params"]
    config = LoRAConfig(rank=2, alpha=3.0, targets=("q_proj", "o_proj"))
    adapters = random_adapters(params, config, 1)
    out = LoRAModel(module, config).apply({"params": {"base": params, "lora": adapters}}, x)

    p = jax.tree.map(np.asarray, params)
    a = jax.tree.map(np.asarray, adapters)
    s = 3.0 / 2
    q = x @ p["q_proj"]["kernel"] + p["q_proj"]["bias"] + s * (x @ a["q_proj"]["lora_a"]) @ a["q_proj"]["lora_b"]
    h = np.maximum(q, 0)
    want = h @ p["o_proj"]["kernel"] + s * (h @ a["o_proj"]["lora_a"]) @ a["o_proj"]["lora_b"]
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


def test_fresh_adapters_are_the_identity_and_dropout_only_touches_the_adapter():
    module = TwoLayers()
    x = jnp.ones((2, 5, 4))
    params = module.init(jax.random.key(0), x)["params"]
    config = LoRAConfig(rank=2, alpha=4.0, dropout=0.5, targets=("q_proj",))
    fresh = init_adapters(params, config, jax.random.key(1))
    assert fresh["q_proj"]["lora_a"].shape == (4, 2) and fresh["q_proj"]["lora_b"].shape == (2, 6)
    model = LoRAModel(module, config)
    base_out = module.apply({"params": params}, x)
    with_fresh = model.apply({"params": {"base": params, "lora": fresh}}, x, dropout_rng=jax.random.key(2))
    np.testing.assert_allclose(with_fresh, base_out, atol=1e-6)  # B = 0: dropout cannot show
    trained = random_adapters(params, config, 3)
    plain = model.apply({"params": {"base": params, "lora": trained}}, x)
    dropped = model.apply({"params": {"base": params, "lora": trained}}, x, dropout_rng=jax.random.key(2))
    assert not np.allclose(plain, dropped)
    # Without adapters the model is the base, whatever the dropout key.
    np.testing.assert_allclose(model.apply({"params": {"base": params, "lora": {}}}, x,
                                           dropout_rng=jax.random.key(2)), base_out, atol=1e-6)


def test_config_refuses_unknown_targets():
    with pytest.raises(ValueError, match=r"`targets`: unknown layer 'qproj'; valid layers: q_proj, k_proj"):
        LoRAConfig(targets=("qproj",))
    with pytest.raises(ValueError, match="`rank` must be"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="`dropout` must be"):
        LoRAConfig(dropout=1.0)


def test_saving_a_lora_model_as_a_plain_model_names_the_ways_to_export(tmp_path):
    from rlhf_jax.models import CausalLM, ModelConfig, save_pretrained

    module = CausalLM(ModelConfig.llama(vocab_size=8, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8))
    with pytest.raises(ValueError, match=r"got LoRAModel \(a LoRAModel: save `module.module` with `merge_adapters"):
        save_pretrained(tmp_path, LoRAModel(module, LoRAConfig()), {})


@pytest.mark.parametrize("family, targets", [
    ("llama", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    ("gpt2", ("qkv_proj", "o_proj", "fc_out")),
    ("qwen3", ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")),
    ("gemma2", ("q_proj", "v_proj", "gate_proj", "up_proj")),
])
def test_exported_adapter_loads_in_peft_with_the_same_logits(hf_lm, tmp_path, family, targets):
    folder, _ = hf_lm[family]
    module, params = load_pretrained(folder)
    config = LoRAConfig(rank=4, alpha=8.0, targets=targets)
    adapters = random_adapters(params, config, 5)
    save_peft_adapter(tmp_path / "adapter", module, adapters, config, base_model_name_or_path=str(folder))
    settings = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert settings["r"] == 4 and settings["lora_alpha"] == 8.0 and settings["task_type"] == "CAUSAL_LM"

    from transformers import AutoModelForCausalLM
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf_model, tmp_path / "adapter").eval()
    ids, mask = padded_batch(7)
    want = torch_logits(peft_model, ids, mask)
    ours = LoRAModel(module, config).apply({"params": {"base": params, "lora": adapters}}, ids, mask)
    merged = module.apply({"params": merge_adapters({"base": params, "lora": adapters}, config.scale)}, ids, mask)
    real = mask[..., None] == 1
    np.testing.assert_allclose(np.where(real, ours, 0), np.where(real, want, 0), atol=1e-4)
    np.testing.assert_allclose(np.where(real, merged, 0), np.where(real, want, 0), atol=1e-4)
    # The adapter does change the model (the comparison is not of two base models).
    base = module.apply({"params": params}, ids, mask)
    assert np.abs(np.where(real, want - base, 0)).max() > 1e-3


def test_peft_adapter_folder_loads_with_the_same_logits(hf_lm, tmp_path):
    folder, _ = hf_lm["llama"]
    from transformers import AutoModelForCausalLM
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    peft_config = PeftLoraConfig(r=3, lora_alpha=5, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "up_proj"],
                                 init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(hf_model, peft_config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    ids, mask = padded_batch(8)
    want = torch_logits(peft_model, ids, mask)

    module, params = load_pretrained(folder)
    config, adapters, modules = load_peft_adapter(tmp_path / "adapter", module)
    assert (config.rank, config.alpha, config.dropout) == (3, 5.0, 0.1)
    assert set(config.targets) == {"q_proj", "v_proj", "up_proj"} and modules == {}
    ours = LoRAModel(module, config).apply({"params": {"base": params, "lora": adapters}}, ids, mask)
    real = mask[..., None] == 1
    np.testing.assert_allclose(np.where(real, ours, 0), np.where(real, want, 0), atol=1e-4)
    base = module.apply({"params": params}, ids, mask)
    assert np.abs(np.where(real, ours - base, 0)).max() > 1e-3  # the adapter is not a no-op


def test_peft_folder_errors_name_the_field(hf_lm, tmp_path):
    folder, _ = hf_lm["llama"]
    module, params = load_pretrained(folder)
    config = LoRAConfig(rank=2, targets=("q_proj",))
    save_peft_adapter(tmp_path / "a", module, init_adapters(params, config, jax.random.key(0)), config)
    settings_path = tmp_path / "a" / "adapter_config.json"
    settings = json.loads(settings_path.read_text())
    settings_path.write_text(json.dumps({**settings, "use_dora": True}))
    with pytest.raises(ValueError, match="`use_dora` = True is not supported"):
        load_peft_adapter(tmp_path / "a", module)
    settings_path.write_text(json.dumps({**settings, "r": 3}))
    with pytest.raises(ValueError, match="has rank 2, but adapter_config.json says r = 3"):
        load_peft_adapter(tmp_path / "a", module)
    with pytest.raises(ValueError, match="adapter_config.json is missing"):
        load_peft_adapter(tmp_path, module)
