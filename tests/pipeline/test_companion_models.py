"""A reference of another architecture or vocabulary, a causal LM given as a reward model, and
a reward model or eval policy of another tokenizer are one error line each (exit 2), before
any training: none of them can score the policy's tokens correctly."""
import jax
import jax.numpy as jnp
import pytest
from stage_helpers import LENGTHS, QUIET, preference_overrides, tiny_task

from rlhf_jax.models.checkpoint_io import save_pretrained
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.heads import RewardModel
from rlhf_jax.models.transformer import CausalLM
from rlhf_jax.pipeline import cli
from rlhf_jax.pipeline.stages.companion_models import architecture_differences
from rlhf_jax.pipeline.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return tiny_task(tmp_path_factory.mktemp("task"))


def model_folder(folder, tokenizer, *, cls=CausalLM, num_layers=1, vocab_size=None, tokenizer_folder=None):
    """A saved tiny Llama (with `tokenizer`, or the tokenizer of `tokenizer_folder`)."""
    config = ModelConfig.llama(vocab_size=vocab_size or len(tokenizer), hidden_size=32, num_layers=num_layers,
                               num_heads=2, intermediate_size=64, max_position_embeddings=64)
    module = cls(config)
    params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"]
    save_pretrained(folder, module, params, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                    bos_token_id=tokenizer.bos_token_id)
    (load_tokenizer(tokenizer_folder) if tokenizer_folder else tokenizer).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def folders(task, tmp_path_factory):
    """The policy, a deeper model, a larger-vocabulary model, a same-size model whose
    tokenizer has two ids swapped, and a reward model; all with the task's tokenizer unless
    said otherwise."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = load_tokenizer(task.tokenizer_dir)
    swapped = root / "swapped_tokenizer"
    vocab = tokenizer.get_vocab()
    first, second = sorted(token for token in vocab if token.isdigit())[:2]
    tokenizer.save_pretrained(str(swapped))
    text = (swapped / "tokenizer.json").read_text()
    text = text.replace(f'"{first}": {vocab[first]}', '"@@": -1').replace(
        f'"{second}": {vocab[second]}', f'"{second}": {vocab[first]}').replace('"@@": -1', f'"{first}": {vocab[second]}')
    (swapped / "tokenizer.json").write_text(text)
    assert load_tokenizer(swapped).get_vocab() != vocab and len(load_tokenizer(swapped)) == len(tokenizer)
    return {
        "policy": model_folder(root / "policy", tokenizer),
        "deeper": model_folder(root / "deeper", tokenizer, num_layers=2),
        "wider_vocab": model_folder(root / "wider_vocab", tokenizer, vocab_size=len(tokenizer) + 8),
        "swapped": model_folder(root / "swapped", tokenizer, tokenizer_folder=swapped),
        "reward": model_folder(root / "reward", tokenizer, cls=RewardModel),
        "swapped_reward": model_folder(root / "swapped_reward", tokenizer, cls=RewardModel, tokenizer_folder=swapped),
    }


def one_error_line(capsys, argv, stage, kind, *culprits):
    capsys.readouterr()
    code = cli.main([str(arg) for arg in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"rlhf-jax {stage}: {kind} error: "), lines[0]
    for culprit in culprits:
        assert str(culprit) in lines[0], (culprit, lines[0])


def grpo_args(task, folders, tmp_path, *extra):
    return ["grpo", f"output_dir={tmp_path / 'grpo'}", f"policy.path={folders['policy']}",
            f"data.train_files=[{task.prompts}]", *LENGTHS, *QUIET, "train.batch_size=2", "grpo.group_size=2",
            "train.iterations=1", *extra]


def test_architecture_differences_name_the_fields():
    base = ModelConfig.llama(vocab_size=20, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    assert architecture_differences(base.replace(dtype="bfloat16", remat=True, eos_token_id=3), base) == []
    assert architecture_differences(base.replace(num_layers=3, vocab_size=24), base) == [
        "vocab_size 24 (policy: 20)", "num_layers 3 (policy: 1)"]


@pytest.mark.parametrize("stage", ["dpo", "grpo"])
def test_a_reference_of_another_architecture_is_refused(task, folders, tmp_path, capsys, stage):
    reference = f"reference={folders['deeper']}"
    argv = (["dpo", *preference_overrides(task, tmp_path / "dpo", folders["policy"], extra=(reference,))]
            if stage == "dpo" else grpo_args(task, folders, tmp_path, reference))
    one_error_line(capsys, argv, stage, "model", f"{folders['deeper']}: `reference` must have the policy's "
                   "architecture", "num_layers 2 (policy: 1)")


def test_a_reference_of_another_vocabulary_is_refused(task, folders, tmp_path, capsys):
    one_error_line(capsys, grpo_args(task, folders, tmp_path, f"reference={folders['wider_vocab']}", "grpo.kl_coef=0.1"),
                   "grpo", "model", "vocab_size")
    one_error_line(capsys, ["dpo", *preference_overrides(task, tmp_path / "dpo", folders["policy"],
                                                          extra=(f"reference={folders['swapped']}",))],
                   "dpo", "config", f"`reference` ({folders['swapped']}): its tokenizer", "is not the policy's tokenizer",
                   "here, ", "in the run's): the reference would read")


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_a_causal_lm_is_not_a_reward_model(task, folders, tmp_path, capsys, stage):
    argv = (grpo_args(task, folders, tmp_path, f"reward.path={folders['policy']}") if stage == "grpo" else
            ["ppo", f"output_dir={tmp_path / 'ppo'}", f"policy.path={folders['policy']}", f"value={folders['policy']}",
             f"reward.path={folders['policy']}", f"data.train_files=[{task.prompts}]", *LENGTHS, *QUIET,
             "train.batch_size=2", "ppo.num_minibatches=1", "train.iterations=1"])
    one_error_line(capsys, argv, stage, "model", f"{folders['policy']}: holds a LlamaForCausalLM checkpoint without "
                   "a reward head (no `score.weight`), not a reward model")


def test_a_reward_model_or_eval_policy_of_another_tokenizer_is_refused(task, folders, tmp_path, capsys):
    one_error_line(capsys, grpo_args(task, folders, tmp_path, f"reward.path={folders['swapped_reward']}"),
                   "grpo", "config", f"`reward.path` ({folders['swapped_reward']}): its tokenizer")
    eval_args = ["eval", f"output_dir={tmp_path / 'eval'}", f"policies={{a: {folders['policy']}, b: {folders['swapped']}}}",
                 f"prompts_file={task.eval_prompts}", "num_samples=1", "max_new_tokens=2"]
    one_error_line(capsys, eval_args, "eval", "config", f"`policies.b` ({folders['swapped']}): its tokenizer",
                   f"is not the tokenizer of `policies.a` ({folders['policy']})", "use a policy trained with the "
                   f"tokenizer of `policies.a`")
    one_error_line(capsys, [*eval_args[:2], f"policies={{a: {folders['policy']}}}", *eval_args[3:],
                            f"reward_model={folders['policy']}"], "eval", "model", "without a reward head")


def test_the_vocabulary_error_names_the_first_token_that_differs():
    from rlhf_jax.pipeline.stages.companion_models import vocabulary_difference
    assert vocabulary_difference({"a": 0, "b": 1, "c": 2}, {"a": 0, "b": 2, "c": 1}) == "'b' is 1 here, 2 in the run's"
    assert vocabulary_difference({"a": 0, "x": 1}, {"a": 0}) == "'x' is 1 here, missing in the run's"
    assert vocabulary_difference({"a": 0}, {"a": 0, "c": 1}) == "'c' (1) is missing here"
