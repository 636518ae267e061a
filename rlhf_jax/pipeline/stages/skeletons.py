"""The training runs of the stages: batches, and the skeletons of the supervised and RL stages.

A supervised stage (sft, reward, dpo) opens with `open_supervised_stage` (output folder,
tokenizer, training and held-out data, mesh), builds its train state and compiled step with
`supervised_state_and_step`, and hands both to `run_supervised_stage` (batches, the loop,
evaluation, export, summary). An RL stage (ppo, grpo) opens with `open_rollout_stage` (the
algorithm config with the tokenizer's ids, prompt batches) and runs its compiled iteration
with `run_rollout_stage`.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rlhf_jax.typed_config import ConfigError
from rlhf_jax.pipeline.batching import BatchIterator
from rlhf_jax.pipeline.data import load_data
from rlhf_jax.pipeline.frozen_base import model_source
from rlhf_jax.pipeline.generation_config import stop_ids
from rlhf_jax.pipeline.loop import run_loop
from rlhf_jax.pipeline.stage_configs import schedule_length, with_schedule_length
from rlhf_jax.pipeline.stages.stage_setup import (
    ConfigRecord, check_batch_shards, check_positions, finish_stage, load_folder, load_reference, open_output_dir,
    place, require, stage_mesh, stage_rng, stage_tokenizer,
)
from rlhf_jax.pipeline.tokenizer import pad_id
from rlhf_jax.pipeline.unpaired import unpaired_data
from rlhf_jax.pipeline.stages.lora import check_lora_reference, reference_of, stage_state
from rlhf_jax.training.batches import PreferenceBatch
from rlhf_jax.training.lora_state import inference_model
from rlhf_jax.training.sharding import replicated
from rlhf_jax.training.step_runner import make_train_step


# ----------------------------------------------------------------------------- batches


def process_share() -> dict:
    """`process_index`/`process_count` arguments: this process's rows of each global batch."""
    return {"process_index": jax.process_index(), "process_count": jax.process_count()}


def check_one_batch(data, batch_size: int, *, drop_last: bool = True, unit: str = "rows") -> None:
    """A ConfigError naming `train.batch_size` when `data` (a `TokenizedData`) holds fewer
    rows than one full batch and incomplete batches are dropped."""
    if drop_last and len(data) < batch_size:
        files = data.files
        hint = "" if unit == "prompts" else ", or set `data.drop_last: false` to complete it with repeated rows"
        raise ConfigError(f"`train.batch_size` ({batch_size}) is more than the {len(data)} {unit} of {files}; "
                          f"set it to at most {len(data)}{hint}")


def train_batches(data, config) -> BatchIterator:
    """`train.batch_size`-row training batches of `data` in the order of `seed`, with the
    stage's `data.shuffle`, `data.drop_last` and `data.bucket_multiple`."""
    check_one_batch(data, config.train.batch_size, drop_last=config.data.drop_last)
    return BatchIterator.from_config(data, config.data, config.train.batch_size, seed=config.seed,
                                     **process_share())


def ordered_batches(data, batch_size: int, max_batches: int | None = None):
    """One pass over `data` in row order (at most `max_batches` batches; None: all), the last
    batch completed with empty rows (`example_mask` 0)."""
    batches = BatchIterator(data, batch_size, shuffle=False, drop_last=False, **process_share())
    return itertools.islice(batches.epoch_batches(), max_batches or batches.batches_per_epoch)


def pair_values(pair_fn, params, data, batch_size: int, mesh, max_batches: int | None = None):
    """`(chosen [N], rejected [N])`: `pair_fn(params, PreferenceBatch) -> (chosen [B],
    rejected [B])` over every pair of `data`, in row order (fixed-shape batches)."""
    chosen, rejected = [], []
    for batch in ordered_batches(data, batch_size, max_batches):
        keep = batch["example_mask"] > 0
        values = jax.device_get(pair_fn(params, place(PreferenceBatch.from_arrays(batch), mesh)))
        chosen.append(np.asarray(values[0])[keep])
        rejected.append(np.asarray(values[1])[keep])
    return np.concatenate(chosen), np.concatenate(rejected)


def nonfinite_options(*optims) -> dict:
    """`run_loop`'s non-finite handling for a stage's optimizer configs (None entries are
    ignored): stop after the smallest `max_consecutive_skips` of those with
    `nonfinite="skip"`, and at the first non-finite metric if any has `nonfinite="halt"`."""
    optims = [optim for optim in optims if optim is not None]
    limits = [optim.max_consecutive_skips for optim in optims if optim.nonfinite == "skip"]
    return {"max_consecutive_skips": min(limits) if limits else None,
            "halt_on_nonfinite": any(optim.nonfinite == "halt" for optim in optims)}


# ----------------------------------------------------------------------------- supervised stages


@dataclasses.dataclass
class SupervisedSetup:
    """What a supervised stage (sft, reward, dpo) opens with."""

    output_dir: Path
    tokenizer: Any
    data: Any  # the training rows (`TokenizedData`)
    eval_data: Any  # the held-out rows, None without `data.eval_files`
    mesh: Any
    record: ConfigRecord  # config.yaml, written when the loop starts (`open_output_dir`)


def load_stage_data(files, tokenizer, data_config, kind: str):
    """`kind` data ("sft", "preference") of `files`; "kto": KTO's unpaired rows from pairs or
    labelled completions, told apart by their columns (`rlhf_jax.pipeline.unpaired`)."""
    if kind == "kto":
        return unpaired_data(load_data(files, tokenizer, dataclasses.replace(data_config, format="auto")))
    return load_data(files, tokenizer, data_config, kind=kind)


def open_supervised_stage(config, *, kind: str, why: str, stage: str, resume: bool = False) -> SupervisedSetup:
    """The output folder, tokenizer, `kind` data ("sft", "preference" or "kto", see
    `load_stage_data`) and mesh of `stage`; `why` says what the stage needs `data.train_files`
    for; with `resume`, the output folder's checkpoints must be ones `stage` can continue."""
    record = open_output_dir(config, resume_stage=stage if resume else None)
    tokenizer = stage_tokenizer(config.tokenizer, config.model.path)
    require(config.data.train_files, "data.train_files", why)
    data = load_stage_data(config.data.train_files, tokenizer, config.data, kind)
    eval_data = (load_stage_data(config.data.eval_files, tokenizer, config.data, kind)
                 if config.data.eval_files else None)
    if config.train.batch_size % config.train.num_microbatches:
        raise ConfigError(f"`train.batch_size` ({config.train.batch_size}) must be a multiple of "
                          f"`train.num_microbatches` ({config.train.num_microbatches})")
    mesh = stage_mesh(config.mesh)
    sizes = {"train.batch_size": config.train.batch_size}
    if eval_data is not None or stage == "dpo":  # eval.batch_size also batches DPO's reference log-probs
        sizes["eval.batch_size"] = config.eval.batch_size
    check_batch_shards(mesh, sizes)
    print_data_start(stage, data, eval_data, tokenizer)
    return SupervisedSetup(record.output_dir, tokenizer, data, eval_data, mesh, record)


def decoded(tokenizer, ids, mask) -> str:
    """`repr` of the real tokens (`mask` 1) of `ids` decoded with their special tokens: the
    text the model reads, after the tokenizer's own normalisation."""
    return repr(tokenizer.decode([int(i) for i in np.asarray(ids)[np.asarray(mask) > 0]], skip_special_tokens=False))


def print_data_start(stage: str, data, eval_data, tokenizer) -> None:
    """The block a user sees when a supervised stage starts: the rows used (skipped, truncated),
    the held-out rows, and the first row's token ids decoded back to text, split into prompt
    and response(s) as the step sees them (a chat template's rendering, the BOS and the appended
    EOS show); for SFT, how many response tokens are trained and, when not all, which text."""
    if jax.process_index() != 0:
        return
    stats = data.stats
    held_out = f"; held-out: {len(eval_data)} rows" if eval_data is not None else ""
    unpaired = ""
    if data.kind == "kto":
        desirable = int(data.arrays["is_desirable"].sum())
        unpaired = f" -> {len(data)} KTO rows ({desirable} desirable, {len(data) - desirable} undesirable)"
    lines = [f"[{stage}] data: {stats.num_used} rows of {stats.num_rows} ({stats.num_skipped} skipped, "
             f"{stats.num_truncated} truncated){unpaired}{held_out}"]
    arrays = data.arrays

    text = functools.partial(decoded, tokenizer)
    prompt = text(arrays["prompt_ids"][0], arrays["prompt_mask"][0])
    responses = [text(ids, mask) for ids, mask in zip(arrays["response_ids"][0], arrays["response_mask"][0])]
    if data.kind == "preference":
        example = f"prompt {prompt} -> chosen {responses[0]} | rejected {responses[1]}"
    elif data.kind == "kto":
        label = "desirable" if arrays["is_desirable"][0] else "undesirable"
        example = f"prompt {prompt} -> completion {responses[0]} ({label})"
    else:
        real = np.asarray(arrays["response_mask"][0, 0]) > 0
        trained = real & (np.asarray(arrays["loss_mask"][0, 0]) > 0)
        example = f"prompt {prompt} -> response {responses[0]} (trained: {trained.sum()} of {real.sum()} tokens)"
        if trained.sum() < real.sum():
            example += f"; trained text {text(arrays['response_ids'][0, 0], trained)}"
    lines.append(f"[{stage}] first example as the model sees it: {example}")
    print("\n".join(lines), flush=True)


def supervised_state_and_step(config, module, params, mesh, step, /, **options):
    """`(state, compiled step)`: a train state whose schedule spans `train.steps` (a LoRA state
    with `lora`), and `step` compiled for it with `train.num_microbatches` and the static
    `options` (which may include a `config=` of the step's own). Prompt plus response lengths
    must fit the model's positions (`stage_setup.check_positions`)."""
    check_positions(module, config.data.max_prompt_length + config.data.max_response_length,
                    "`data.max_prompt_length` + `data.max_response_length`")
    state, shardings = stage_state(module, params, with_schedule_length(config.optim, schedule_length(config)), mesh,
                                   config.lora, config.seed)
    return state, make_train_step(step, mesh=mesh, state_shardings=shardings,
                                  num_microbatches=config.train.num_microbatches, **options)


def run_supervised_stage(stage: str, config, setup: SupervisedSetup, module, state, step, *,
                         prepare_batch, evaluate=None, progress_keys, description: str | None = None,
                         resume: bool = False) -> dict:
    """Train `state` with the compiled `step` for `train.steps` steps of `train_batches`
    (carry `{"state", "rng"}`), evaluating `evaluate(params) -> {name: value}` every
    `eval.every` steps and at the end (`params` of `inference_model(module, state)`: with
    LoRA, the base and adapters that `LoRAModel.apply` takes); export the model when
    finished; the stage's summary."""

    def step_fn(carry, batch):
        new_state, metrics = step(carry["state"], batch)
        return {"state": new_state, "rng": carry["rng"]}, metrics

    setup.record.write()  # the start-up passed: config.yaml now describes this run
    result = run_loop(
        output_dir=setup.output_dir, carry={"state": state, "rng": stage_rng(config.seed, setup.mesh)},
        step_fn=step_fn, batches=train_batches(setup.data, config), prepare_batch=prepare_batch,
        num_steps=config.train.steps, checkpoint=config.checkpoint, logging=config.logging,
        resume=resume, stop_after=config.train.stop_after,
        evaluate=None if evaluate is None else lambda carry: evaluate(inference_model(module, carry["state"])[1]),
        eval_every=config.eval.every, description=description or stage, progress_keys=progress_keys,
        compiled=() if config.data.bucket_multiple else (step,), **nonfinite_options(config.optim),
        base_sources={"state": model_source(config.model, "model", config.seed)},
    )
    return finish_stage(stage, setup.output_dir, result, module, result.carry["state"], setup.tokenizer,
                        {"data": vars(setup.data.stats)}, base_path=config.model.path,
                        save_dtype=config.model.save_dtype)


# ----------------------------------------------------------------------------- RL stages


def sampling_with_tokenizer(sampling, tokenizer, key: str = "sampling", model_folder=None):
    """The sampling config with its stop (EOS) and pad ids resolved against the tokenizer.

    Unset ids (None, the default) are the model's: the stop ids are the tokenizer's EOS and
    the other EOS ids of `<model_folder>/generation_config.json` (as transformers' `generate`
    stops; `generation_config.stop_ids`), the pad id is the tokenizer's, or its EOS when it
    has no pad token (as in TRL; the response masks, not the ids, say where a response ends).
    Ids set in the config (`<key>.eos_token_id`: one id or a list, `<key>.pad_token_id`)
    replace these, as a generation config's ids do in transformers, and must be ids of the
    tokenizer's vocabulary (a ConfigError naming the key otherwise)."""
    vocab = len(tokenizer)
    defaults = {"eos_token_id": lambda: stop_ids(tokenizer, model_folder), "pad_token_id": lambda: pad_id(tokenizer)}
    resolved = {}
    for name, default in defaults.items():
        value = getattr(sampling, name)
        for one in () if value is None else value if isinstance(value, tuple) else (value,):
            if not 0 <= one < vocab:
                raise ConfigError(f"`{key}.{name}` ({one}) is not an id of the tokenizer's vocabulary "
                                  f"(0..{vocab - 1}); leave it unset (null) to use the model's ({default()})")
        resolved[name] = default() if value is None else value
    return dataclasses.replace(sampling, **resolved)


def prompt_batches(config, tokenizer, *, seed: int) -> BatchIterator:
    """`train.batch_size`-prompt batches of the `data.train_files` prompts (full batches only)."""
    require(config.data.train_files, "data.train_files", "RL needs prompt data")
    data = load_data(config.data.train_files, tokenizer, config.data, kind="prompt")
    check_one_batch(data, config.train.batch_size, unit="prompts")
    return BatchIterator(data, config.train.batch_size, seed=seed, shuffle=config.data.shuffle,
                         drop_last=True, **process_share())


@dataclasses.dataclass
class RolloutSetup:
    """What an RL stage (ppo, grpo) opens with."""

    output_dir: Path
    tokenizer: Any
    algorithm: Any  # the stage's algorithm config, its sampling with the tokenizer's EOS/pad ids
    batches: BatchIterator  # prompt batches
    mesh: Any
    record: ConfigRecord  # config.yaml, written when the loop starts (`open_output_dir`)


def open_rollout_stage(config, section: str, *, rows: int, rows_key: str, resume: bool = False) -> RolloutSetup:
    """The output folder, tokenizer, algorithm config (`config.<section>`), prompt batches and
    mesh of an RL stage (named `section`), whose `rows` responses per rollout (`rows_key` in
    errors) must split into the algorithm's `num_minibatches`; with `resume`, the output
    folder's checkpoints must be ones this stage can continue."""
    tokenizer = stage_tokenizer(config.tokenizer, config.policy.path, model_key="policy.path")
    algorithm = getattr(config, section)
    algorithm = dataclasses.replace(algorithm, sampling=sampling_with_tokenizer(
        algorithm.sampling, tokenizer, f"{section}.sampling", config.policy.path))
    # config.yaml records the stop / pad ids the stage samples with
    config = dataclasses.replace(config, **{section: algorithm})
    record = open_output_dir(config, resume_stage=section if resume else None)
    if rows % algorithm.num_minibatches:
        raise ConfigError(f"`{rows_key}` ({rows}) must be a multiple of "
                          f"`{section}.num_minibatches` ({algorithm.num_minibatches})")
    batches = prompt_batches(config, tokenizer, seed=config.seed)
    mesh = stage_mesh(config.mesh)
    check_batch_shards(mesh, {"train.batch_size": config.train.batch_size})
    return RolloutSetup(record.output_dir, tokenizer, algorithm, batches, mesh, record)


def check_rollout_positions(config, section: str, policy_module) -> None:
    """Prompts plus sampled tokens fit the policy's positions (`stage_setup.check_positions`)."""
    sampling = getattr(config, section).sampling
    check_positions(policy_module, config.data.max_prompt_length + sampling.max_new_tokens,
                    f"`data.max_prompt_length` + `{section}.sampling.max_new_tokens`", "policy")


def place_prompt_batch(batch, mesh) -> dict:
    """A host prompt batch as `iterate` receives it: its ids, mask and `row_index` (the data
    rows, which the host scorer gathers with the rollout) placed over the mesh."""
    return place({key: batch[key] for key in ("prompt_ids", "prompt_mask", "row_index")}, mesh)


def print_rollout_start(stage: str, setup: RolloutSetup, scoring: list[str]) -> None:
    """The block a user sees when an RL stage starts: the prompt data (rows, columns, one
    prompt as the model sees it, prompts cut or skipped), the ids responses stop at and what
    scores the responses."""
    if jax.process_index() != 0:
        return
    data = setup.batches.data
    stats = data.stats
    columns = [name for name in data.columns if name != "prompt_text"]
    example = decoded(setup.tokenizer, data.arrays["prompt_ids"][0], data.arrays["prompt_mask"][0]) if len(data) else "''"
    lines = [f"[{stage}] prompts: {stats.num_used} rows of {stats.num_rows} "
             f"({stats.num_skipped} skipped, {stats.num_truncated} truncated); columns: {', '.join(columns)}",
             f"[{stage}] first prompt as the model sees it: {example}",
             f"[{stage}] responses stop at: {stop_names(setup.tokenizer, setup.algorithm.sampling.stop_ids)}",
             f"[{stage}] scored by: {'; '.join(scoring)}"]
    print("\n".join(lines), flush=True)


def stop_names(tokenizer, ids) -> str:
    """`'<eos>' (1), '<end_of_turn>' (106)`: each stop id with its token."""
    return ", ".join(f"{tokenizer.convert_ids_to_tokens(i)!r} ({i})" for i in ids)


def reward_keys(host) -> tuple[str, ...]:
    """`reward/<name>/mean` of a `HostScorer`'s reward functions (shown in progress lines)."""
    functions = getattr(host, "functions", None)
    return tuple(f"reward/{name}/mean" for name in functions.names) if functions is not None else ()


def frozen_reference(config, policy_module, policy_params, tokenizer, mesh):
    """The frozen reference policy's parameters, replicated over `mesh`: the `reference`
    folder (default `policy.path`; one of another architecture or vocabulary than
    `policy_module` and `tokenizer` is refused), else a copy of the fresh policy's
    `policy_params`. With `lora`: no parameters of its own, the policy's base with the
    adapters disabled."""
    if config.lora is not None:
        check_lora_reference(config, config.policy.path)
        return reference_of(config.lora)
    if config.reference:
        ref_params = load_reference(config.reference, policy_module, tokenizer)[1]
    elif config.policy.path:
        ref_params = load_folder(config.policy.path, head="lm", key="reference")[1]
    else:
        ref_params = jax.tree.map(lambda x: x.copy(), policy_params)
    return jax.device_put(ref_params, replicated(mesh))


def kl_reference(config, stage: str, kl_coef: float, policy_module, policy_params, tokenizer, mesh):
    """`frozen_reference` when the stage has a KL penalty; with `<stage>.kl_coef` 0 (fixed, or
    adaptive: its multiplicative updates keep 0) None, and a warning when `reference` is set,
    since that folder is then never read (not even checked)."""
    if kl_coef > 0:
        return frozen_reference(config, policy_module, policy_params, tokenizer, mesh)
    if config.reference:
        warnings.warn(f"reference={config.reference} is not read: {stage}.kl_coef is 0, so no KL to a "
                      f"reference is computed or logged", stacklevel=2)
    return None


def run_rollout_stage(stage: str, config, setup: RolloutSetup, policy_module, carry, iterate, *,
                      compiled, progress_keys, resume: bool = False, base_sources=None) -> dict:
    """Run `train.iterations` rounds of `iterate(carry, batch, key) -> (carry, metrics)` (the
    `compiled` phases; `carry` holds the states, e.g. `policy`) on the prompt batches, with a
    fresh key from the checkpointed `rng` each round; export the policy when finished; the
    stage's summary. `batch` holds the placed `prompt_ids`, `prompt_mask` and the host
    `row_index` (the data rows, for the reward functions' columns). `base_sources` names where
    the frozen bases of LoRA states other than the policy come from (`run_loop`)."""
    split = jax.jit(jax.random.split, out_shardings=replicated(setup.mesh))

    def step_fn(carry, batch):
        rng, key = split(carry["rng"])
        new_carry, metrics = iterate(carry, batch, key)
        return {**new_carry, "rng": rng}, metrics

    setup.record.write()  # the start-up passed: config.yaml now describes this run
    result = run_loop(
        output_dir=setup.output_dir, carry={**carry, "rng": stage_rng(config.seed, setup.mesh)},
        step_fn=step_fn, batches=setup.batches,
        prepare_batch=lambda batch: place_prompt_batch(batch, setup.mesh),
        num_steps=config.train.iterations, checkpoint=config.checkpoint, logging=config.logging,
        resume=resume, stop_after=config.train.stop_after, description=stage,
        progress_keys=progress_keys, compiled=compiled,
        **nonfinite_options(config.optim, getattr(config, "value_optim", None)),
        base_sources={"policy": model_source(config.policy, "policy", config.seed), **(base_sources or {})},
    )
    return finish_stage(stage, setup.output_dir, result, policy_module, result.carry["policy"], setup.tokenizer,
                        base_path=config.policy.path, save_dtype=config.policy.save_dtype,
                        sampling=setup.algorithm.sampling,
                        other_states=[value for name, value in result.carry.items()
                                      if name != "policy" and hasattr(value, "opt_state")])


__all__ = [
    "process_share", "train_batches", "nonfinite_options", "ordered_batches", "pair_values", "SupervisedSetup",
    "load_stage_data", "open_supervised_stage", "print_data_start", "supervised_state_and_step", "run_supervised_stage",
    "sampling_with_tokenizer", "check_rollout_positions", "prompt_batches", "RolloutSetup", "open_rollout_stage",
    "place_prompt_batch", "print_rollout_start", "reward_keys", "frozen_reference", "run_rollout_stage",
]
