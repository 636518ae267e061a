"""The RL stages' sampling EOS / pad ids: unset (null) means the tokenizer's, a set id must be
one of its vocabulary and overrides it, and config.yaml records the ids sampled with."""
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
                                          r"tokenizer's vocabulary.*unset \(null\) to use the tokenizer's"):
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
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())[section]["sampling"]
    assert (saved["eos_token_id"], saved["pad_token_id"]) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert setup.algorithm.sampling.eos_token_id == tokenizer.eos_token_id
    # a set id is used and recorded
    setup = open_rollout_stage(load_stage_config(cls, None, overrides + [f"{section}.sampling.pad_token_id=3"]),
                               section, rows=2, rows_key="train.batch_size")
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
