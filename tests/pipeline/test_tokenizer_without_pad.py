"""A model folder whose tokenizer has no pad token (Llama, Mistral): the RL stages and
evaluation pad with EOS, as TRL does (tests/training/test_rollout.py checks that such a rollout
equals one with a distinct pad id)."""
import json

import jax
import jax.numpy as jnp
import pytest
from transformers import AutoTokenizer

from rlhf_jax.models.checkpoint_io import save_pretrained
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import CausalLM
from rlhf_jax.pipeline.stages import evaluate
from rlhf_jax.pipeline.stages.skeletons import sampling_with_tokenizer
from rlhf_jax.pipeline.tasks import write_jsonl
from rlhf_jax.pipeline.tokenizer import build_tokenizer, load_tokenizer, pad_id
from rlhf_jax.training.rollout import SamplingConfig


@pytest.fixture(scope="module")
def padless_model(tmp_path_factory):
    """A tiny policy folder whose tokenizer_config.json names no pad token."""
    folder = tmp_path_factory.mktemp("padless") / "model"
    build_tokenizer(folder, "0123456789+=")
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("pad_token")
    config_file.write_text(json.dumps(config))
    tokenizer = load_tokenizer(folder)
    assert tokenizer.pad_token is None
    module = CausalLM(ModelConfig.llama(vocab_size=len(tokenizer), hidden_size=32, num_layers=1, num_heads=2,
                                        intermediate_size=64, max_position_embeddings=32))
    params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"]
    save_pretrained(folder, module, params, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    return folder


def test_pad_id_falls_back_to_eos(padless_model, tmp_path):
    assert pad_id(load_tokenizer(padless_model)) == AutoTokenizer.from_pretrained(padless_model).eos_token_id
    with_pad = build_tokenizer(tmp_path, "0123456789+=")
    assert pad_id(with_pad) == with_pad.pad_token_id != with_pad.eos_token_id


def test_rl_sampling_pads_with_eos(padless_model):
    tokenizer = load_tokenizer(padless_model)
    sampling = sampling_with_tokenizer(SamplingConfig(max_new_tokens=4), tokenizer)
    assert sampling.eos_token_id == sampling.pad_token_id == tokenizer.eos_token_id


def test_eval_with_a_tokenizer_without_pad_token(padless_model, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": "1+2=", "answer": "3"}, {"prompt": "13+4=", "answer": "17"}])
    results = evaluate.run(None, [f"output_dir={tmp_path / 'eval'}", f"policies={{a: {padless_model}}}",
                                  f"prompts_file={prompts}", "num_samples=2", "max_prompt_length=8",
                                  "max_new_tokens=4", "batch_size=4", "report=false"])
    assert 0.0 <= results["policies"]["a"]["pass@1"] <= 1.0
