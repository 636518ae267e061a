"""The exported model folder's storage dtype (`model.save_dtype` / `policy.save_dtype`): by
default the source folder's config.json dtype, float32 for a fresh model; transformers loads
the folder in that dtype with logits close to the float32 export."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import CausalLM
from rlhf_jax.pipeline.stages.stage_setup import export_dtype, export_model, source_dtype
from rlhf_jax.pipeline.stage_configs import SFTConfig
from rlhf_jax.pipeline.tokenizer import build_tokenizer
from rlhf_jax.typed_config import ConfigError, from_dict


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"), "0123456789+=")


@pytest.fixture(scope="module")
def model(tokenizer):
    module = CausalLM(ModelConfig.llama(vocab_size=len(tokenizer), hidden_size=16, num_layers=1, num_heads=2,
                                        intermediate_size=32, max_position_embeddings=16))
    return module, module.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"]


def source_folder(tmp_path, config: dict):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_source_dtype_reads_dtype_or_torch_dtype(tmp_path):
    assert source_dtype(None) == "float32"
    assert source_dtype(str(tmp_path / "missing")) == "float32"
    assert source_dtype(source_folder(tmp_path / "a", {"torch_dtype": "bfloat16"})) == "bfloat16"
    assert source_dtype(source_folder(tmp_path / "b", {"dtype": "float16", "torch_dtype": "float32"})) == "float16"
    assert source_dtype(source_folder(tmp_path / "c", {"torch_dtype": "auto"})) == "float32"
    assert export_dtype("float16", source_folder(tmp_path / "d", {"dtype": "bfloat16"})) == "float16"
    with pytest.raises(ConfigError, match="save_dtype"):
        export_dtype("int8", None)


def test_save_dtype_is_a_checked_config_key():
    assert from_dict(SFTConfig, {}).model.save_dtype == "source"
    with pytest.raises(ConfigError, match="save_dtype"):
        from_dict(SFTConfig, {"model": {"save_dtype": "fp8"}})


def test_bfloat16_source_exports_bfloat16_that_transformers_loads(tokenizer, model, tmp_path):
    source = source_folder(tmp_path / "source", {"torch_dtype": "bfloat16"})
    half = export_model(tmp_path / "half", *model, tokenizer, source)
    full = export_model(tmp_path / "full", *model, tokenizer, source, save_dtype="float32")
    fresh = export_model(tmp_path / "fresh", *model, tokenizer)  # no source folder: float32
    config = json.loads((half / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert json.loads((fresh / "config.json").read_text())["dtype"] == "float32"
    sizes = {name: (folder / "model.safetensors").stat().st_size for name, folder in
             {"half": half, "full": full, "fresh": fresh}.items()}
    assert sizes["half"] < 0.6 * sizes["full"] and sizes["fresh"] == sizes["full"]
    assert {str(t.dtype) for t in load_file(half / "model.safetensors").values()} <= {"bfloat16"}

    ids = torch.tensor([[1, 4, 5, 6, 7]])
    half_model = AutoModelForCausalLM.from_pretrained(half)  # dtype from config.json
    assert half_model.dtype == torch.bfloat16
    full_model = AutoModelForCausalLM.from_pretrained(full)
    assert full_model.dtype == torch.float32
    with torch.no_grad():
        low = half_model(ids).logits.float().numpy()
        high = full_model(ids).logits.numpy()
    np.testing.assert_allclose(low, high, atol=0.05 * np.abs(high).max() + 1e-3)
