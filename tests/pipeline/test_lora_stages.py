"""The stages with `lora`: a DPO run on a small SFT model, its PEFT export, continuing from an
adapter folder, resume, the RL stages, and config errors."""
from __future__ import annotations

import json
import re
import shutil

import jax
import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from stage_helpers import LENGTHS, QUIET, sft_overrides, tiny_task
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf_jax.models.checkpoint_io import load_pretrained, save_pretrained
from rlhf_jax.pipeline import cli
from rlhf_jax.pipeline.checkpoint import restore_checkpoint
from rlhf_jax.typed_config import ConfigError
from rlhf_jax.pipeline.data import DataConfig, load_data
from rlhf_jax.pipeline.metrics_log import read_metrics
from rlhf_jax.pipeline.stage_configs import LoRASection
from rlhf_jax.pipeline.stages import dpo, grpo, ppo, reward, sft, stage_setup
from rlhf_jax.pipeline.stages.dpo import dataset_logps, make_pair_logps
from rlhf_jax.pipeline.stages.lora import stage_state
from rlhf_jax.pipeline.tasks import write_jsonl
from rlhf_jax.pipeline.tokenizer import load_tokenizer
from rlhf_jax.training.optim import OptimizerConfig
from rlhf_jax.training.sharding import MeshConfig, make_mesh

LORA = ("lora.rank=2", "lora.alpha=16", "lora.targets=[q_proj,v_proj]")


def stopping_pairs(path, problems):
    """Pairs that prefer the answer alone over the answer written twice ("12" over "1212")."""
    write_jsonl(path, [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b) * 2}
                       for a, b in problems])
    return path


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """A tiny task, an SFT model trained on it, and train / held-out stopping pairs (disjoint
    prompts)."""
    root = tmp_path_factory.mktemp("lora")
    task = tiny_task(root / "task")
    sft.run(None, sft_overrides(task, root / "sft", steps=8, extra=("checkpoint.interval=0",)))
    problems = [(a, b) for a in range(10) for b in range(10)]
    order = np.random.default_rng(0).permutation(len(problems))
    train = stopping_pairs(root / "train_pairs.jsonl", [problems[i] for i in order[:64]])
    held_out = stopping_pairs(root / "held_out_pairs.jsonl", [problems[i] for i in order[64:96]])
    return {"root": root, "task": task, "sft": root / "sft" / "model", "train": train, "held_out": held_out}


def dpo_overrides(setting, output_dir, *, steps, extra=()):
    return [f"output_dir={output_dir}", f"model.path={setting['sft']}", f"data.train_files=[{setting['train']}]",
            f"data.eval_files=[{setting['held_out']}]", *LENGTHS, *QUIET, f"train.steps={steps}",
            "train.batch_size=8", "optim.learning_rate=0.01", "eval.batch_size=32", "checkpoint.interval=2",
            "dpo.beta=0.1", *LORA, *extra]


@pytest.fixture(scope="module")
def lora_dpo(setting):
    out = setting["root"] / "dpo"
    return out, dpo.run(None, dpo_overrides(setting, out, steps=12, extra=("eval.every=4",)))


def held_out_logps(folder, setting):
    module, params = load_pretrained(folder)
    data = load_data([setting["held_out"]], load_tokenizer(setting["sft"]),
                     DataConfig(max_prompt_length=8, max_response_length=8), kind="preference")
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    return dataset_logps(make_pair_logps(module.apply), params, data, 32, mesh)


def test_lora_dpo_raises_held_out_preference_accuracy(setting, lora_dpo):
    out, result = lora_dpo
    assert result["finished"] and (out / "adapter" / "adapter_model.safetensors").is_file()
    rows = [row for row in read_metrics(out) if "eval/dpo/accuracy" in row]
    # The policy starts as its reference (implicit rewards all 0, accuracy 0); after 12 LoRA
    # steps its implicit reward orders unseen pairs.
    assert rows[-1]["eval/dpo/accuracy"] >= 0.75 and rows[-1]["eval/dpo/margin"] > rows[0]["eval/dpo/margin"]
    before = held_out_logps(setting["sft"], setting)
    after = held_out_logps(out / "model", setting)
    assert np.mean(after[0] - after[1]) > np.mean(before[0] - before[1])
    assert np.mean(after[0] > after[1]) >= np.mean(before[0] > before[1])


def test_lora_optimizer_state_is_under_five_percent_of_full_fine_tuning(setting):
    module, params = load_pretrained(setting["sft"])
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    optim = OptimizerConfig(learning_rate=0.01)
    section = LoRASection(rank=2, alpha=16, targets=["q_proj", "v_proj"])
    lora_state, _ = stage_state(module, params, optim, mesh, section, seed=0)
    full_state, _ = stage_setup.make_state(module, jax.tree.map(np.array, params), optim, mesh)
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
    ratio = nbytes(lora_state.opt_state) / nbytes(full_state.opt_state)
    assert 0 < ratio < 0.05, ratio
    assert nbytes(lora_state.params) < 0.05 * nbytes(full_state.params)


def test_exported_adapter_loads_in_peft_like_the_merged_model(setting, lora_dpo):
    out, _ = lora_dpo
    settings = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert settings["r"] == 2 and settings["target_modules"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert settings["base_model_name_or_path"] == str(setting["sft"].resolve())
    base = AutoModelForCausalLM.from_pretrained(setting["sft"], dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    ids = torch.tensor(np.random.default_rng(0).integers(3, merged.config.vocab_size, (2, 9)))
    with torch.no_grad():
        want, got = merged(input_ids=ids).logits.numpy(), adapted(input_ids=ids).logits.numpy()
        with adapted.disable_adapter():
            plain = adapted(input_ids=ids).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(got - plain).max() > 1e-3  # the adapter was trained


def test_training_continues_from_a_peft_adapter_folder(setting, lora_dpo, tmp_path):
    """One step at a negligible learning rate from the exported adapter: the model is the
    adapted one (first loss below log 2, since the reference is the base without adapters)."""
    out, _ = lora_dpo
    overrides = dpo_overrides(setting, tmp_path, steps=1) + [f"lora.path={out / 'adapter'}",
                                                              "optim.learning_rate=1e-12"]
    result = dpo.run(None, overrides)
    assert read_metrics(tmp_path)[0]["dpo/loss"] < 0.69
    before = jax.tree.leaves(load_pretrained(out / "model")[1])
    after = jax.tree.leaves(load_pretrained(tmp_path / "model")[1])
    for x, y in zip(before, after):
        np.testing.assert_allclose(x, y, atol=1e-6)
    assert result["adapter_dir"] == str(tmp_path / "adapter")


def test_cli_continues_from_a_folder_written_by_peft(setting, tmp_path):
    """`rlhf-jax dpo lora.path=<PEFT folder>` on an adapter that `peft` itself saved (other
    rank, alpha and layers than the command line's): the run adopts them, exports the adapter
    to <output_dir>/adapter and the merged model to <output_dir>/model, and (at a negligible
    rate) both give the logits of `peft`'s model."""
    base = AutoModelForCausalLM.from_pretrained(setting["sft"], dtype=torch.float32)
    peft_config = PeftLoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"],
                                 init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(base, peft_config).save_pretrained(tmp_path / "peft")
    out = tmp_path / "run"
    overrides = dpo_overrides(setting, out, steps=1) + [f"lora.path={tmp_path / 'peft'}", "optim.learning_rate=1e-12",
                                                        "checkpoint.interval=0"]
    assert cli.main(["dpo", *overrides]) == 0
    settings = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (settings["r"], settings["lora_alpha"]) == (3, 6)
    assert sorted(settings["target_modules"]) == ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]
    base = AutoModelForCausalLM.from_pretrained(setting["sft"], dtype=torch.float32)
    original = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(setting["sft"], dtype=torch.float32)
    exported = PeftModel.from_pretrained(base, out / "adapter").eval()
    ids = torch.tensor(np.random.default_rng(2).integers(3, merged.config.vocab_size, (2, 9)))
    with torch.no_grad():
        want = original(input_ids=ids).logits.numpy()
        np.testing.assert_allclose(merged(input_ids=ids).logits.numpy(), want, atol=1e-4)
        np.testing.assert_allclose(exported(input_ids=ids).logits.numpy(), want, atol=1e-4)
        with original.disable_adapter():
            assert np.abs(original(input_ids=ids).logits.numpy() - want).max() > 1e-3  # not a no-op


def checkpoint_leaves(run_dir) -> dict:
    """`{leaf path: array}` of the latest checkpoint's state in `run_dir`, and its metadata."""
    state, meta = restore_checkpoint(run_dir / "checkpoints")
    named = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}
    return named, meta


def assert_holds_no_base(run_dir, states, base_folder):
    """The checkpoint's LoRA states (`states`) hold adapters and their optimizer state but no
    base weight: none under `apply_fn`, and all arrays far smaller than the base model."""
    named, meta = checkpoint_leaves(run_dir)
    assert not [name for name in named if "'base'" in name]
    for state in states:
        assert any(name.startswith(f"['{state}']") and "lora_a" in name for name in named), state
        assert meta["frozen_bases"][f"{state}.apply_fn"]["fingerprint"]
    stored = sum(np.asarray(leaf).nbytes for leaf in named.values())
    base = sum(np.asarray(x).nbytes for x in jax.tree.leaves(load_pretrained(base_folder)[1]))
    assert stored < 0.2 * len(states) * base, (stored, base)
    return named, meta


def test_lora_checkpoint_holds_adapters_and_optimizer_state_but_no_base(setting, lora_dpo):
    out, _ = lora_dpo
    named, meta = assert_holds_no_base(out, ["state"], setting["sft"])
    assert any("opt_state" in name for name in named)
    assert meta["frozen_bases"]["state.apply_fn"]["key"] == "model.path"
    assert meta["frozen_bases"]["state.apply_fn"]["source"] == f"model.path={setting['sft']}"


def test_resume_reads_the_base_again_and_refuses_another_one(setting, lora_dpo, tmp_path, capsys):
    """Resuming the finished run's last checkpoint (no steps left) on a copy of the base in
    another folder gives the same model; on a base with one weight changed it is a one-line
    checkpoint error naming `model.path`, exit code 2."""
    out, _ = lora_dpo
    same, other = tmp_path / "same_base", tmp_path / "other_base"
    shutil.copytree(setting["sft"], same)
    shutil.copytree(setting["sft"], other)
    module, params = load_pretrained(same)
    params = jax.tree.map(np.array, params)
    params["decoder"]["final_norm"]["scale"][0] += 1.0
    save_pretrained(other, module, params)
    for run in ("resumed", "refused"):
        shutil.copytree(out / "checkpoints", tmp_path / run / "checkpoints")
    overrides = dpo_overrides(setting, tmp_path / "resumed", steps=12) + [f"model.path={same}"]
    result = dpo.run(None, overrides, resume=True)
    assert result["resumed_from"] == 12 and result["finished"]
    for name in ("adapter/adapter_model.safetensors", "model/model.safetensors"):
        assert (tmp_path / "resumed" / name).read_bytes() == (out / name).read_bytes(), name
    overrides = dpo_overrides(setting, tmp_path / "refused", steps=12) + [f"model.path={other}"]
    capsys.readouterr()
    assert cli.main(["dpo", "--resume", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rlhf-jax dpo: checkpoint error: `model.path`: the frozen base "
                                               "differs from the one the checkpoint"), err
    assert f"now model.path={other}" in err[0]


@pytest.mark.slow
def test_lora_dpo_killed_and_resumed_matches_uninterrupted(setting, tmp_path):
    """With adapter dropout: the dropout key is part of the checkpointed state."""
    extra = ("lora.dropout=0.1",)
    dpo.run(None, dpo_overrides(setting, tmp_path / "a", steps=5, extra=extra))
    overrides = dpo_overrides(setting, tmp_path / "b", steps=5, extra=extra)
    stopped = dpo.run(None, overrides + ["train.stop_after=3"])
    assert not stopped["finished"]
    resumed = dpo.run(None, overrides, resume=True)
    assert resumed["finished"] and resumed["resumed_from"] == 2
    assert read_metrics(tmp_path / "a") == read_metrics(tmp_path / "b")
    for name in ("adapter/adapter_model.safetensors", "model/model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


@pytest.mark.slow
def test_rl_stages_train_adapters(setting, tmp_path):
    def overrides(name):
        return [f"output_dir={tmp_path / name}", f"policy.path={setting['sft']}",
                f"data.train_files=[{setting['task'].prompts}]", *LENGTHS, *QUIET, "reward.kind=gold",
                "train.iterations=2", "optim.learning_rate=0.01", "checkpoint.interval=0", *LORA]

    pad = load_tokenizer(setting["sft"]).convert_tokens_to_ids("=")  # any id: padding is masked
    result = grpo.run(None, overrides("grpo") + ["train.batch_size=2", "grpo.group_size=4",
                                                  "grpo.sampling.max_new_tokens=5", f"grpo.sampling.pad_token_id={pad}"])
    assert result["finished"] and (tmp_path / "grpo" / "adapter" / "adapter_config.json").is_file()
    # the exported generation_config.json pads with the id the stage sampled with
    assert json.loads((tmp_path / "grpo" / "model" / "generation_config.json").read_text())["pad_token_id"] == pad
    assert np.isfinite(read_metrics(tmp_path / "grpo")[-1]["grpo/kl"])
    assert_holds_no_base(tmp_path / "grpo", ["policy"], setting["sft"])
    ppo_overrides = overrides("ppo") + [f"value={setting['sft']}", "train.batch_size=8",
                                        "ppo.sampling.max_new_tokens=5", "ppo.num_minibatches=2", "ppo.epochs=1"]
    grpo_trained = result["trainable_parameters"]
    result = ppo.run(None, ppo_overrides)
    assert result["finished"] and "value/loss" in read_metrics(tmp_path / "ppo")[0]
    # the policy's and the value model's adapters, and the value head (hidden 32 + bias)
    assert result["trainable_parameters"] == 2 * grpo_trained + 33
    assert load_pretrained(tmp_path / "ppo" / "model")[0].config.num_layers == 1
    named, meta = assert_holds_no_base(tmp_path / "ppo", ["policy", "value"], setting["sft"])
    assert any("'value'" in name and "'score'" in name for name in named)  # the value head, trained in full
    assert meta["frozen_bases"]["value.apply_fn"]["key"] == "value"
    # Resuming the last checkpoint (no iterations left) re-reads both bases: the same model.
    exported = (tmp_path / "ppo" / "model" / "model.safetensors").read_bytes()
    assert ppo.run(None, ppo_overrides, resume=True)["resumed_from"] == 2
    assert (tmp_path / "ppo" / "model" / "model.safetensors").read_bytes() == exported


@pytest.mark.slow
def test_lora_reward_model_trains_its_head_in_full_and_loads_in_peft(setting, tmp_path):
    """SEQ_CLS adapter with the fresh `score` head as a module trained in full."""
    overrides = [f"output_dir={tmp_path}", f"model.path={setting['sft']}", f"data.train_files=[{setting['train']}]",
                 *LENGTHS, *QUIET, "train.steps=2", "train.batch_size=8", "optim.learning_rate=0.01",
                 "checkpoint.interval=0", *LORA]
    assert reward.run(None, overrides)["finished"]
    named, _ = assert_holds_no_base(tmp_path, ["state"], setting["sft"])
    assert any("'modules'" in name and "'score'" in name for name in named)  # the head, trained in full
    settings = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert settings["task_type"] == "SEQ_CLS" and settings["modules_to_save"] == ["score"]
    base = AutoModelForSequenceClassification.from_pretrained(setting["sft"], num_labels=1, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    ids = torch.tensor(np.random.default_rng(1).integers(3, merged.config.vocab_size, (2, 7)))
    with torch.no_grad():
        np.testing.assert_allclose(adapted(input_ids=ids).logits.numpy(), merged(input_ids=ids).logits.numpy(),
                                   atol=1e-4)


@pytest.mark.parametrize("stage, override, message", [
    ("sft", "lora.targets=[qproj]", r"`lora.targets`: unknown layer 'qproj'; valid layers: q_proj, k_proj"),
    ("dpo", "lora.rank=0", r"`lora.rank` must be an integer >= 1"),
    ("grpo", "lora.dropout=0.1", r"`lora.dropout` must be 0 in the RL stages"),
    ("sft", "lora.rnak=2", r"unknown config key 'lora.rnak'.*valid keys: alpha, dropout, path, rank, targets"),
])
def test_bad_lora_settings_exit_2_naming_the_key(stage, override, message, capsys):
    assert cli.main([stage, override]) == 2
    err = capsys.readouterr().err
    assert f"rlhf-jax {stage}: config error" in err and re.search(message, err), err


def test_lora_refuses_a_separate_reference_and_a_missing_adapter(setting, tmp_path):
    with pytest.raises(ConfigError, match="`reference`: with `lora` the reference policy is the base model"):
        dpo.run(None, dpo_overrides(setting, tmp_path / "a", steps=1, extra=(f"reference={tmp_path / 'ref'}",)))
    with pytest.raises(ConfigError, match="`lora.path`: adapter folder .* does not exist"):
        dpo.run(None, dpo_overrides(setting, tmp_path / "b", steps=1, extra=(f"lora.path={tmp_path / 'none'}",)))


def test_an_adapter_of_a_shallower_model_is_refused(tmp_path):
    """An adapter covering layer 0 of a 2-layer model (trained on another, 1-layer base) would
    train only that layer: a config error naming `lora.path` and the layers left out."""
    from rlhf_jax.models.config import ModelConfig
    from rlhf_jax.models.lora import LoRAConfig, init_adapters
    from rlhf_jax.models.peft_io import save_peft_adapter
    from rlhf_jax.models.transformer import CausalLM
    from rlhf_jax.pipeline.stages.lora import lora_parts

    def model(layers):
        module = CausalLM(ModelConfig.llama(vocab_size=16, hidden_size=16, num_layers=layers, num_heads=2,
                                            intermediate_size=32))
        return module, module.init(jax.random.PRNGKey(0), jax.numpy.zeros((1, 2), jax.numpy.int32))["params"]

    lora = LoRAConfig(rank=2, alpha=4.0, targets=("q_proj",))
    shallow, shallow_params = model(1)
    save_peft_adapter(tmp_path / "adapter", shallow, init_adapters(shallow_params, lora, jax.random.PRNGKey(1)), lora)
    section = LoRASection(path=str(tmp_path / "adapter"))
    assert lora_parts(section, shallow, shallow_params, jax.random.PRNGKey(2))[0].targets == ("q_proj",)
    deeper, deeper_params = model(2)
    with pytest.raises(ConfigError, match=r"^`lora.path`: .*adapter adapts 1 of the model's 2 q_proj layers "
                                          r"\(not .*layers_1.*q_proj\): it was trained on another base model"):
        lora_parts(section, deeper, deeper_params, jax.random.PRNGKey(2))
