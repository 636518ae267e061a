"""The exported model folder's generation_config.json: the source folder's with the tokenizer's
ids, or a minimal one; transformers reads the folder and the file."""
import json

import jax
import jax.numpy as jnp
import pytest
from transformers import AutoModelForCausalLM, GenerationConfig

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.heads import RewardModel
from rlhf_jax.models.transformer import CausalLM
from rlhf_jax.pipeline.generation_config import stop_ids, write_generation_config
from rlhf_jax.pipeline.stages.stage_setup import export_model
from rlhf_jax.pipeline.tokenizer import build_tokenizer
from rlhf_jax.training.rollout import SamplingConfig


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"), "0123456789+=")


def tiny(tokenizer, cls=CausalLM):
    module = cls(ModelConfig.llama(vocab_size=len(tokenizer), hidden_size=16, num_layers=1, num_heads=2,
                                   intermediate_size=32, max_position_embeddings=16))
    return module, module.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"]


def test_minimal_config_transformers_reads(tokenizer, tmp_path):
    folder = export_model(tmp_path / "run", *tiny(tokenizer), tokenizer)
    generation = GenerationConfig.from_pretrained(folder)
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == ids
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == ids[1:]


def test_source_config_is_copied_with_the_tokenizers_ids(tokenizer, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": 99, "pad_token_id": 98,
         "bos_token_id": 97}))
    folder = export_model(tmp_path / "run", *tiny(tokenizer), tokenizer, str(source))
    generation = GenerationConfig.from_pretrained(folder)
    assert (generation.do_sample, generation.temperature, generation.top_p) == (True, 0.6, 0.9)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert AutoModelForCausalLM.from_pretrained(folder).generation_config.temperature == 0.6
    # a list of stop ids that holds the tokenizer's EOS is kept
    (source / "generation_config.json").write_text(json.dumps({"eos_token_id": [tokenizer.eos_token_id, 7]}))
    write_generation_config(folder, tokenizer, source)
    assert GenerationConfig.from_pretrained(folder).eos_token_id == [tokenizer.eos_token_id, 7]


def test_unreadable_source_gives_a_minimal_config_and_a_reward_model_none(tokenizer, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "generation_config.json").write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        write_generation_config(tmp_path, tokenizer, source)
    assert GenerationConfig.from_pretrained(tmp_path).eos_token_id == tokenizer.eos_token_id
    folder = export_model(tmp_path / "reward", *tiny(tokenizer, RewardModel), tokenizer, str(source))
    assert not (folder / "generation_config.json").exists()


def test_an_rl_stages_sampling_eos_comes_first_and_its_pad_is_used(tokenizer, tmp_path):
    """A policy trained to stop at another EOS (a chat model's end of turn) stops there in
    transformers too; the tokenizer's EOS (and a source list's ids) still stop it."""
    stop, pad = 7, 5
    assert stop != tokenizer.eos_token_id
    sampling = SamplingConfig(max_new_tokens=4, eos_token_id=stop, pad_token_id=pad)
    folder = export_model(tmp_path / "run", *tiny(tokenizer), tokenizer, sampling=sampling)
    generation = GenerationConfig.from_pretrained(folder)
    assert (generation.eos_token_id, generation.pad_token_id) == ([stop, tokenizer.eos_token_id], pad)
    source = tmp_path / "source"
    source.mkdir()
    (source / "generation_config.json").write_text(json.dumps({"eos_token_id": [tokenizer.eos_token_id, 9],
                                                               "temperature": 0.7}))
    write_generation_config(folder, tokenizer, source, sampling)
    generation = GenerationConfig.from_pretrained(folder)
    assert (generation.eos_token_id, generation.temperature) == ([stop, tokenizer.eos_token_id, 9], 0.7)
    # sampling with the tokenizer's own EOS changes nothing
    same = SamplingConfig(max_new_tokens=4, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    write_generation_config(folder, tokenizer, None, same)
    generation = GenerationConfig.from_pretrained(folder)
    assert (generation.eos_token_id, generation.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    # several stop ids come first, in their order, then the others
    several = SamplingConfig(max_new_tokens=4, eos_token_id=(9, stop), pad_token_id=pad)
    write_generation_config(folder, tokenizer, source, several)
    assert GenerationConfig.from_pretrained(folder).eos_token_id == [9, stop, tokenizer.eos_token_id]
    # and a folder written so reads back as the stop ids the policy was trained with
    assert stop_ids(tokenizer, folder) == (tokenizer.eos_token_id, 9, stop)
