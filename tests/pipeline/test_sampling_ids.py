"""The RL stages' sampling stop (EOS) and pad ids: unset (null) means the model's (the
tokenizer's EOS and the other EOS ids of the policy folder's generation_config.json), set ids
must be of the tokenizer's vocabulary and replace them, and config.yaml records the ids
sampled with."""
import dataclasses

import pytest
import yaml

from rlhf_jax.pipeline.stage_configs import GRPOStageConfig, PPOStageConfig, load_stage_config
from rlhf_jax.pipeline.stages.skeletons import open_rollout_stage, sampling_with_tokenizer
from rlhf_jax.pipeline.tasks import write_jsonl
from rlhf_jax.pipeline.tokenizer import build_tokenizer
from rlhf_jax.training.rollout import SamplingConfig
from rlhf_jax.typed_config import ConfigError


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"), "0123456789+=")


def test_unset_ids_are_the_tokenizers(tokenizer):
    assert SamplingConfig().eos_token_id is None and SamplingConfig().pad_token_id is None
    sampling = sampling_with_tokenizer(SamplingConfig(), tokenizer, "grpo.sampling")
    assert (sampling.eos_token_id, sampling.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert tokenizer.eos_token_id != tokenizer.pad_token_id


def test_set_ids_override_within_the_vocabulary(tokenizer):
    last = len(tokenizer) - 1
    sampling = sampling_with_tokenizer(SamplingConfig(eos_token_id=last, pad_token_id=0), tokenizer, "ppo.sampling")
    assert (sampling.eos_token_id, sampling.pad_token_id) == (last, 0)
    with pytest.raises(ConfigError, match=r"`ppo\.sampling\.eos_token_id` \(\d+\) is not an id of the "
                                          r"tokenizer's vocabulary.*unset \(null\) to use the model's"):
        sampling_with_tokenizer(SamplingConfig(eos_token_id=len(tokenizer)), tokenizer, "ppo.sampling")
    with pytest.raises(ConfigError, match="`grpo.sampling.pad_token_id`"):
        sampling_with_tokenizer(SamplingConfig(pad_token_id=10_000), tokenizer, "grpo.sampling")
    with pytest.raises(ValueError, match="eos_token_id"):
        SamplingConfig(eos_token_id=-1)


def test_unset_ids_cannot_sample():
    from rlhf_jax.training.rollout import generate_rollout
    import numpy as np
    with pytest.raises(ValueError, match="eos_token_id` must be set"):
        generate_rollout(None, np.zeros((1, 2), np.int32), np.ones((1, 2), np.int32), None,
                         sampling=SamplingConfig())


@pytest.mark.parametrize("cls,section", [(GRPOStageConfig, "grpo"), (PPOStageConfig, "ppo")])
def test_config_yaml_records_the_ids_used_and_resume_reads_it(tmp_path, cls, section):
    folder = tmp_path / "policy"
    tokenizer = build_tokenizer(folder, "0123456789+=")
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": "1+2="}, {"prompt": "3+4="}])
    overrides = [f"output_dir={tmp_path / 'run'}", f"policy.path={folder}", f"data.train_files=[{prompts}]",
                 "data.format=prompt", "train.batch_size=2", "mesh.data=1", f"{section}.num_minibatches=1"]
    config = load_stage_config(cls, None, overrides)
    assert getattr(config, section).sampling.eos_token_id is None
    setup = open_rollout_stage(config, section, rows=2, rows_key="train.batch_size")
    setup.record.write()  # as the stage does when its loop starts
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())[section]["sampling"]
    assert (saved["eos_token_id"], saved["pad_token_id"]) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert setup.algorithm.sampling.eos_token_id == tokenizer.eos_token_id
    # a set id is used and recorded
    setup = open_rollout_stage(load_stage_config(cls, None, overrides + [f"{section}.sampling.pad_token_id=3"]),
                               section, rows=2, rows_key="train.batch_size")
    setup.record.write()
    assert setup.algorithm.sampling.pad_token_id == 3
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())[section]["sampling"]["pad_token_id"] == 3
    # --resume against the saved config.yaml (with checkpoints present) is accepted
    (tmp_path / "run" / "checkpoints" / "1").mkdir(parents=True)
    setup = open_rollout_stage(config, section, rows=2, rows_key="train.batch_size", resume=True)
    assert setup.algorithm.sampling.pad_token_id == tokenizer.pad_token_id


def test_the_gold_scorer_stops_at_the_sampling_eos(tokenizer):
    """With `sampling.eos_token_id` set, a response ending at that id counts as stopped."""
    import numpy as np
    from rlhf_jax.pipeline.stages.scoring import gold_scores
    prompt = np.asarray([tokenizer.encode("1+2=", add_special_tokens=False)])
    stop = tokenizer.convert_tokens_to_ids("+")
    response = np.asarray([tokenizer.encode("3", add_special_tokens=False) + [stop]])
    assert gold_scores(tokenizer, prompt, response, eos_token_id=stop) == [1.0]
    assert gold_scores(tokenizer, prompt, response) == [0.0]  # no tokenizer EOS: did not stop


def test_the_gold_scorer_reads_the_answer_without_special_tokens(tmp_path):
    """A chat model ends its turn with an end-of-turn special token before the EOS: the answer
    before it is still the answer (it scored 0 when decoded with special tokens)."""
    import numpy as np
    from rlhf_jax.pipeline.stages.scoring import gold_scores
    from rlhf_jax.pipeline.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(tmp_path, "0123456789+=")
    end_of_turn = tokenizer.convert_tokens_to_ids("<|assistant|>")  # a special token, not the EOS
    prompt = np.asarray([tokenizer.encode("1+2=", add_special_tokens=False)] * 3)
    three = tokenizer.convert_tokens_to_ids("3")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    response = np.asarray([[three, end_of_turn, eos, pad], [three, end_of_turn, pad, pad], [three, eos, three, three]])
    np.testing.assert_array_equal(gold_scores(tokenizer, prompt, response), [1.0, 0.0, 1.0])


def test_several_stop_ids_are_a_tuple_of_python_ints():
    import numpy as np
    sampling = SamplingConfig(eos_token_id=[np.int64(5), 7, 5], pad_token_id=np.int32(0),
                              max_new_tokens=np.int64(4), top_k=np.int32(2))
    assert sampling.eos_token_id == (5, 7) and sampling.stop_ids == (5, 7)  # first occurrences, in order
    assert all(type(i) is int for i in (*sampling.eos_token_id, sampling.pad_token_id,
                                        sampling.max_new_tokens, sampling.top_k))
    hash(sampling)  # a static jit argument
    assert SamplingConfig(eos_token_id=3).stop_ids == (3,) and SamplingConfig().stop_ids == ()
    with pytest.raises(ValueError, match="empty list"):
        SamplingConfig(eos_token_id=[])
    with pytest.raises(ValueError, match="`eos_token_id` must be a token id"):
        SamplingConfig(eos_token_id=[1, -2])
    with pytest.raises(ValueError, match="`eos_token_id` must be a token id"):
        SamplingConfig(eos_token_id="</s>")


def _folder_with_stops(tmp_path, stops):
    import json
    folder = tmp_path / "chat_model"
    tokenizer = build_tokenizer(folder, "0123456789+=")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": stops, "do_sample": True}))
    return folder, tokenizer


def test_unset_stop_ids_add_the_generation_configs(tmp_path):
    """As transformers' generate: a chat model folder's generation_config.json lists its end-of-turn
    token next to the EOS, and responses stop at either (the tokenizer's EOS first)."""
    end_of_turn = 4
    folder, tokenizer = _folder_with_stops(tmp_path, [end_of_turn, 2 ** 20])
    eos = tokenizer.eos_token_id
    with pytest.warns(UserWarning, match=r"EOS id 1048576 is not an id of the tokenizer's vocabulary"):
        sampling = sampling_with_tokenizer(SamplingConfig(), tokenizer, "grpo.sampling", folder)
    # set ids do not read the file (no warning)
    assert sampling.eos_token_id == (eos, end_of_turn)
    assert sampling_with_tokenizer(SamplingConfig(), tokenizer, "grpo.sampling").eos_token_id == eos  # no folder
    # set ids replace them; each must be of the vocabulary
    assert sampling_with_tokenizer(SamplingConfig(eos_token_id=[7, 8]), tokenizer, "x", folder).eos_token_id == (7, 8)
    with pytest.raises(ConfigError, match=r"`ppo\.sampling\.eos_token_id` \(99\) is not an id.*the model's "
                                          r"\(\(1, 4\)\)"), pytest.warns(UserWarning, match="EOS id"):
        sampling_with_tokenizer(SamplingConfig(eos_token_id=[7, 99]), tokenizer, "ppo.sampling", folder)


def test_config_yaml_records_several_stop_ids(tmp_path):
    folder, tokenizer = _folder_with_stops(tmp_path, [1, 4])
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": "1+2="}, {"prompt": "3+4="}])
    overrides = [f"output_dir={tmp_path / 'run'}", f"policy.path={folder}", f"data.train_files=[{prompts}]",
                 "train.batch_size=2", "mesh.data=1"]
    setup = open_rollout_stage(load_stage_config(GRPOStageConfig, None, overrides), "grpo", rows=2,
                               rows_key="train.batch_size")
    setup.record.write()
    expected = tuple(dict.fromkeys([tokenizer.eos_token_id, 1, 4]))
    assert setup.algorithm.sampling.eos_token_id == expected
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["grpo"]["sampling"]
    assert saved["eos_token_id"] == list(expected)
    # a list given on the command line is used as it is, and --resume reads the recorded list back
    config = load_stage_config(GRPOStageConfig, None, overrides + ["grpo.sampling.eos_token_id=[6,5]"])
    assert config.grpo.sampling.eos_token_id == (6, 5)
    assert open_rollout_stage(config, "grpo", rows=2, rows_key="train.batch_size").algorithm.sampling.stop_ids == (6, 5)
    (tmp_path / "run" / "checkpoints" / "1").mkdir(parents=True)
    open_rollout_stage(config, "grpo", rows=2, rows_key="train.batch_size", resume=True)


def test_rollouts_and_eval_samples_stop_at_any_stop_id(tokenizer, tmp_path):
    """A response ends at the first token that is any of the stop ids: the rollout's mask and
    `has_eos`, `rlhf-jax eval`'s samples and eos_rate, and the gold scorer all agree."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from rlhf_jax.models.config import ModelConfig
    from rlhf_jax.models.transformer import CausalLM
    from rlhf_jax.pipeline import eval_metrics
    from rlhf_jax.pipeline.stage_configs import EvalConfig
    from rlhf_jax.pipeline.stages.evaluate import sample_policy
    from rlhf_jax.pipeline.stages.scoring import decode_until_eos
    from rlhf_jax.training.rollout import generate_rollout
    from rlhf_jax.training.state import create_train_state

    module = CausalLM(ModelConfig.llama(vocab_size=len(tokenizer), hidden_size=16, num_layers=1, num_heads=2,
                                        intermediate_size=32, max_position_embeddings=16))
    params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"]
    state = create_train_state(module, params, optax.sgd(0.1))
    prompt_ids = jnp.asarray([tokenizer.encode("1+2=", add_special_tokens=False)] * 2, jnp.int32)
    prompt_mask = jnp.ones_like(prompt_ids)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    free = SamplingConfig(max_new_tokens=5, greedy=True, eos_token_id=eos, pad_token_id=pad)
    tokens = np.asarray(generate_rollout(state, prompt_ids, prompt_mask, jax.random.PRNGKey(1),
                                         sampling=free).response_ids)[0, 0]
    assert eos not in tokens[:3]
    stop = int(tokens[2])  # the third greedy token becomes a stop id
    first = int(np.argmax(tokens == stop))
    two = dataclasses.replace(free, eos_token_id=(eos, stop))
    out = generate_rollout(state, prompt_ids, prompt_mask, jax.random.PRNGKey(1), sampling=two)
    np.testing.assert_array_equal(np.asarray(out.response_mask)[0, 0], np.arange(5) <= first)
    assert bool(np.asarray(out.has_eos)[0, 0]) and tuple(np.asarray(out.response_ids)[0, 0, :first + 1]) == tuple(
        tokens[:first + 1])
    texts, ended = decode_until_eos(tokenizer, np.asarray(out.response_ids)[:, 0], (eos, stop))
    assert ended.all() and texts[0] == tokenizer.decode(tokens[:first], skip_special_tokens=True)
    # eval samples (at temperature 1) end at the first stop id of either kind
    config = EvalConfig(max_new_tokens=5, batch_size=2, temperature=1.0)
    samples = sample_policy(module, params, np.asarray(prompt_ids), np.asarray(prompt_mask), config, tokenizer,
                            (eos, stop))
    for row, mask in zip(samples["tokens"], samples["mask"]):
        hits = np.isin(row, (eos, stop))
        length = int(np.argmax(hits)) + 1 if hits.any() else 5
        assert mask.sum() == length
    assert eval_metrics.eos_rate(samples["tokens"], samples["mask"], (eos, stop)) == samples["finished"].mean()
