"""`model.attention_impl` / `policy.attention_impl`: parsed and validated from a stage config,
carried by the models a stage builds (loaded or fresh, and the value / reward models loaded
beside a policy), and used by their forward pass."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import layers
from rlhf_jax.models.checkpoint_io import save_pretrained
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import CausalLM
from rlhf_jax.pipeline import cli
from rlhf_jax.pipeline.stage_configs import GRPOStageConfig, ModelSection, SFTConfig, load_stage_config
from rlhf_jax.pipeline.stages import stage_setup
from rlhf_jax.pipeline.tokenizer import build_tokenizer

TINY = ModelConfig(model_type="llama", vocab_size=16, hidden_size=16, num_layers=1, num_heads=2,
                   intermediate_size=32, max_position_embeddings=32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Llama folder and a character tokenizer."""
    root = tmp_path_factory.mktemp("attention_impl")
    module = CausalLM(TINY)
    save_pretrained(root / "model", module, module.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"])
    return root / "model", build_tokenizer(root / "tokenizer", "0123456789+=")


@pytest.mark.parametrize("config_class, section", [(SFTConfig, "model"), (GRPOStageConfig, "policy")])
def test_the_key_is_read_from_the_command_line(config_class, section):
    assert getattr(load_stage_config(config_class, None, []), section).attention_impl == "auto"
    config = load_stage_config(config_class, None, [f"{section}.attention_impl=blockwise"])
    assert getattr(config, section).attention_impl == "blockwise"


@pytest.mark.parametrize("stage, section", [("sft", "model"), ("grpo", "policy")])
def test_a_bad_value_is_a_config_error_naming_the_key(stage, section, capsys):
    assert cli.main([stage, f"{section}.attention_impl=flash"]) == 2
    err = capsys.readouterr().err
    assert (f"rlhf-jax {stage}: config error: `{section}.attention_impl` must be one of "
            f"['auto', 'plain', 'blockwise'], got 'flash'") in err, err


@pytest.mark.parametrize("impl", ["plain", "blockwise"])
def test_loaded_fresh_and_side_models_carry_the_choice_and_use_it(folder, impl, monkeypatch):
    path, tokenizer = folder
    rng = jax.random.PRNGKey(1)
    loaded, params = stage_setup.build_model(ModelSection(path=str(path), attention_impl=impl), tokenizer, rng)
    fresh, _ = stage_setup.build_model(ModelSection(init=TINY.replace(attention_impl="auto"), attention_impl=impl),
                                       tokenizer, rng, head="reward")
    value, _ = stage_setup.load_folder(str(path), head="value", key="value", attention_impl=impl)
    assert [m.config.attention_impl for m in (loaded, fresh, value)] == [impl] * 3
    # The forward pass takes the chosen path even where "auto" would take the other (4 tokens).
    calls = []
    original = layers.blockwise_attention
    monkeypatch.setattr(layers, "blockwise_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    ids = jnp.asarray(np.arange(4)[None] % TINY.vocab_size, jnp.int32)
    logits = loaded.apply({"params": params}, ids)
    auto = type(loaded)(loaded.config.replace(attention_impl="auto")).apply({"params": params}, ids)
    assert bool(calls) == (impl == "blockwise")
    np.testing.assert_allclose(np.asarray(logits), np.asarray(auto), atol=1e-5)  # same values either way
