"""What the stage modules share: output folders, tokenizer and model set-up, mesh, export.

The training runs themselves (batches, the supervised and RL stage skeletons) are in
`rlhf_jax.pipeline.stages.skeletons`.

Every stage writes into its `output_dir`:

    config.yaml        the resolved config (file + overrides + defaults)
    metrics.jsonl      one row per logged step (see `rlhf_jax.pipeline.metrics_log`)
    tensorboard/       TensorBoard event files
    checkpoints/<step> orbax checkpoints (train state, RNG, data position; with `lora` the
                       frozen base is left out and re-read on resume)
    model/             the final model as a Hugging Face folder, its tokenizer saved alongside,
                       so the next stage (or `transformers`) loads it with one path (with
                       `lora`: the adapters merged into the base); a policy also with
                       generation_config.json (`rlhf_jax.pipeline.generation_config`)
    adapter/           with `lora`: the adapter as a PEFT folder (adapter_config.json +
                       adapter_model.safetensors) that `peft` loads onto the base model
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from rlhf_jax.models.checkpoint_io import ADAPTER_FOLDER, is_adapter_folder, load_pretrained, save_pretrained
from rlhf_jax.models.errors import ModelError
from rlhf_jax.models.heads import RewardModel, ValueModel
from rlhf_jax.models.peft_io import save_peft_adapter
from rlhf_jax.models.transformer import CausalLM
from rlhf_jax.typed_config import ConfigError, to_dict
from rlhf_jax.pipeline.errors import NonFiniteError, OutputError
from rlhf_jax.pipeline.generation_config import write_generation_config
from rlhf_jax.pipeline.resume_check import changed_settings, check_resume, checkpointed_config, stage_of
from rlhf_jax.pipeline.stage_configs import ModelSection, with_schedule_lengths
from rlhf_jax.pipeline.stages.companion_models import check_reference, check_reward_model, folder_tokenizer
from rlhf_jax.pipeline.tokenizer import load_tokenizer
from rlhf_jax.training import multihost
from rlhf_jax.training.nonfinite import nonfinite_leaves
from rlhf_jax.training.optim import OptimizerConfig, make_optimizer
from rlhf_jax.training.sharding import (
    BATCH_AXES,
    MeshConfig,
    make_mesh,
    param_shardings,
    replicated,
    shard_batch,
)
from rlhf_jax.training.lora_state import is_lora_state, merged_params
from rlhf_jax.training.state import create_train_state, train_state_shardings

MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
logger = logging.getLogger(__name__)
OUTPUT_FOLDERS = ("checkpoints", "tensorboard", MODEL_DIR, ADAPTER_DIR)  # folders a stage writes in its output_dir
_MODULES = {"lm": CausalLM, "reward": RewardModel, "value": ValueModel}


def _unwritable(path, err: OSError) -> OutputError:
    return OutputError(f"`output_dir`: cannot write {path}: {err.strerror or err}")


# Config keys naming folders a stage reads its models, adapters or tokenizer from (eval's
# `policies` entries are `policies.<name>`).
SOURCE_FOLDER_KEYS = ("model.path", "policy.path", "reference", "value", "reward.path", "reward_model", "tokenizer",
                      "lora.path")


def _lookup(tree, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict):
            return None
        tree = tree.get(part)
    return tree


def source_folders(resolved: dict) -> list[tuple[str, str]]:
    """`(key, folder)` of every source folder set in a resolved config (a dict)."""
    found = [(key, _lookup(resolved, key)) for key in SOURCE_FOLDER_KEYS]
    policies = resolved.get("policies")
    if isinstance(policies, dict):
        found += [(f"policies.{name}", folder) for name, folder in policies.items()]
    return [(key, folder) for key, folder in found if isinstance(folder, str) and folder]


def check_output_dir(resolved: dict) -> None:
    """An OutputError when `output_dir` is a folder the stage reads from (`model.path`,
    `policy.path`, `reference`, `value`, `reward.path`, `tokenizer`, ...) or inside one: the run
    would write its checkpoints, logs and model into the user's model folder; and (training
    stages) when such a folder is one the run replaces (`<output_dir>/model`, ...: a model
    trained by an earlier run in the same `output_dir`). Paths are compared resolved
    (symlinks, `..`), whether they exist or not."""
    output_dir = Path(resolved["output_dir"]).resolve()
    for key, folder in source_folders(resolved):
        source = Path(folder).resolve()
        if output_dir == source or output_dir.is_relative_to(source):
            where = "is" if output_dir == source else "is inside"
            raise OutputError(f"`output_dir` ({resolved['output_dir']}) {where} the folder of `{key}` ({folder}); "
                              f"the run would write checkpoints/, model/ and its logs there: give `output_dir` "
                              f"another folder")
        if stage_of(resolved) == "eval":  # eval writes a report, no model or checkpoints
            continue
        for name in OUTPUT_FOLDERS:  # a training stage replaces these: e.g. the model it reads
            written = output_dir / name
            if source == written or source.is_relative_to(written):
                raise OutputError(f"`{key}` ({folder}) is in the `{name}/` folder of `output_dir` "
                                  f"({resolved['output_dir']}), which this run replaces: give `output_dir` another "
                                  f"folder")


def _keep_earlier_config(config_file: Path) -> Path:
    """Copy `config_file` to `config.<n>.yaml` next to it, n the first free number from 1."""
    n = 1
    while (kept := config_file.with_name(f"config.{n}.yaml")).exists():
        n += 1
    try:
        shutil.copyfile(config_file, kept)
    except OSError as err:
        raise _unwritable(kept, err) from None
    return kept


@dataclasses.dataclass
class ConfigRecord:
    """A run's `config.yaml`, to be written once its start-up has passed (`open_output_dir`)."""

    output_dir: Path
    text: str  # the resolved config as YAML
    changes: list  # settings a --resume changes (old -> new); empty for a fresh run

    def write(self) -> None:
        """Keep the earlier config.yaml as `config.<n>.yaml` when a --resume changes settings
        (a warning line on stderr names them), then write this one (process 0); an OSError (a
        full disk) is an OutputError naming config.yaml."""
        if jax.process_index() != 0:
            return
        config_file = self.output_dir / "config.yaml"
        kept = _keep_earlier_config(config_file) if self.changes else None
        try:
            config_file.write_text(self.text)
        except OSError as err:  # no permission, a full disk (ENOSPC carries no file name)
            raise _unwritable(config_file, err) from None
        if self.changes:
            print(f"warning: --resume changes {', '.join(self.changes)} from {config_file} (kept as {kept})",
                  file=sys.stderr, flush=True)


def open_output_dir(config, *, resume_stage: str | None = None) -> ConfigRecord:
    """Check and create `config.output_dir`; return the `ConfigRecord` of the resolved config
    (with the optimizer schedules the stage trains with: `with_schedule_lengths`), which the
    stage writes to `config.yaml` once its start-up checks (data, models, reward functions)
    have passed: a run that fails before its first step leaves an earlier run's config.yaml
    (and its config.<n>.yaml history) as they were.

    An output directory that cannot be written (a file in the way, no permission) is an
    OutputError naming the path before any work is done (a probe file is created and
    removed; a full disk shows when config.yaml is written); so is a file where the stage will put a folder (checkpoints/, model/, ...),
    and an output directory that is (or is inside) a source model or tokenizer folder
    (`check_output_dir`). `resume_stage`: the stage that will `--resume` here; checkpoints it
    cannot continue (of another stage, or of other LoRA / architecture settings) are a
    CheckpointError (`rlhf_jax.pipeline.resume_check`). Other settings that changed since the
    checkpointed run (`changed_settings`; `train.stop_after` aside) are accepted; the record
    names them (`ConfigRecord.write`).
    """
    output_dir = Path(config.output_dir)
    resolved = to_dict(with_schedule_lengths(config))
    check_output_dir(resolved)
    text = yaml.safe_dump(resolved, sort_keys=False)
    changes = []
    if jax.process_index() == 0:
        if resume_stage is not None:
            check_resume(output_dir, resolved, resume_stage)
            saved = checkpointed_config(output_dir)
            changes = changed_settings(saved, yaml.safe_load(text)) if saved is not None else []
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _unwritable(err.filename or output_dir, err) from None
        try:
            with tempfile.NamedTemporaryFile("w", dir=output_dir, prefix=".write_probe."):
                pass
        except OSError as err:
            raise _unwritable(output_dir / "config.yaml", err) from None
        for name in OUTPUT_FOLDERS:
            if (output_dir / name).exists() and not (output_dir / name).is_dir():
                raise OutputError(f"`output_dir`: {output_dir / name} is a file, but the stage writes "
                                  f"a folder there; move it away")
    return ConfigRecord(output_dir, text, changes)


def prepare_output_dir(config, *, resume_stage: str | None = None) -> Path:
    """`open_output_dir` and write its config.yaml at once (stages with no start-up to wait
    for: eval, the quickstart's own folder); returns the output directory."""
    record = open_output_dir(config, resume_stage=resume_stage)
    record.write()
    return record.output_dir


def require(value, key: str, why: str):
    """`value`, or a ConfigError naming `key` when it is None or empty."""
    if value is None or value == "" or value == [] or value == {}:
        raise ConfigError(f"`{key}` must be set: {why}")
    return value


def check_not_run_folder(folder, key: str) -> None:
    """A ModelError naming `key` when `folder` is not a model folder but a stage's output
    folder (its model is in `model/`) or a PEFT adapter folder (`adapter/`)."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return
    if (folder / MODEL_DIR / "config.json").is_file():
        raise ModelError(folder, f"a run's output folder, not a model folder: give `{key}` its exported "
                                 f"model, {folder / MODEL_DIR}")
    if is_adapter_folder(folder):
        raise ModelError(folder, f"{ADAPTER_FOLDER}: give `{key}` a model folder "
                                 f"(a LoRA run exports the merged model next to it, in {folder.parent / MODEL_DIR}), "
                                 f"or continue training the adapter with `lora.path`")


def stage_tokenizer(tokenizer_path: str | None, model_path: str | None, key: str = "tokenizer", *,
                    model_key: str = "model.path"):
    """The tokenizer of `tokenizer_path`, else of the model folder (a folder that is missing
    or holds no readable tokenizer is a ModelError naming it; a missing model folder is
    named as such, with `model_key`, not as a missing tokenizer)."""
    folder = tokenizer_path or model_path
    require(folder, key, "a tokenizer folder (or a model folder that holds one) is needed")
    if not tokenizer_path and not Path(folder).is_dir():
        raise ModelError(folder, f"no such model folder (`{model_key}`)")
    if Path(folder).is_dir():
        check_not_run_folder(folder, key if tokenizer_path else model_key)
    tokenizer = load_tokenizer(folder)
    if tokenizer_path and model_path:
        check_same_vocabulary(tokenizer, tokenizer_path, model_path, key, model_key)
    return tokenizer


def check_same_vocabulary(tokenizer, tokenizer_path, model_path, key: str, model_key: str) -> None:
    """A ConfigError when the model folder holds a tokenizer of its own whose vocabulary
    differs from `tokenizer`'s (loaded from `tokenizer_path`): the model would read ids
    that mean other tokens (e.g. a recipe's `tokenizer` kept next to a `model.path` override)."""
    model_folder = Path(model_path)
    if model_folder.is_dir() and Path(tokenizer_path).resolve() == model_folder.resolve():
        return
    own = folder_tokenizer(model_folder)  # None: none, or an unreadable one (not the one in use)
    if own is not None and own.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"`{key}` ({tokenizer_path}, {len(tokenizer)} tokens) is not the tokenizer of `{model_key}` "
            f"({model_path}, {len(own)} tokens): the model would read ids that mean other tokens; set "
            f"`{key}: null` to use the model folder's own tokenizer")


def fresh_model_config(section: ModelSection, tokenizer):
    """`section.init` with the tokenizer's vocabulary size and special token ids, and the
    section's `dtype`, `remat` and `attention_impl`."""
    config = require(section.init, "model.init", "give `model.path` (a model folder) or "
                     "`model.init` (the architecture of a fresh model)")
    return config.replace(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          dtype=section.dtype, remat=section.remat, attention_impl=section.attention_impl)


def build_model(section: ModelSection, tokenizer, rng, *, head: str = "lm", key: str = "model"):
    """`(module, params)`: `section.path` loaded as a Hugging Face folder with `head` (a
    ModelError names a folder that is missing or cannot be loaded), or a fresh model from
    `section.init` (initialised from `rng`); either with the section's `dtype`, `remat` and
    `attention_impl`."""
    if section.path:
        if not Path(section.path).is_dir():
            raise ModelError(section.path, f"no such model folder (`{key}.path`)")
        check_not_run_folder(section.path, f"{key}.path")
        return load_pretrained(section.path, head=head, dtype=section.dtype, remat=section.remat, rng=rng,
                               attention_impl=section.attention_impl)
    module = _MODULES[head](fresh_model_config(section, tokenizer))
    params = module.init(rng, jnp.zeros((1, 2), jnp.int32))["params"]
    return module, params


def check_positions(module, tokens: int, what: str, key: str = "model") -> None:
    """Sequences of up to `tokens` tokens (`what`: the config keys that add up to it) fit the
    model `module` (`key`): more than its learned positions (GPT-2) is a ConfigError (their
    embeddings do not exist); more than a RoPE model's `max_position_embeddings` logs a
    warning (positions it was not trained on)."""
    config = module.config
    if tokens <= config.max_position_embeddings:
        return
    message = (f"{what} = {tokens} tokens, more than the `{key}` model's max_position_embeddings "
               f"({config.max_position_embeddings})")
    if config.position_embedding == "learned":
        raise ConfigError(f"{message}: it has no position embeddings past them; lower the lengths")
    logger.warning("%s: RoPE runs past them, at positions the model was not trained on", message)


def load_folder(path: str | None, *, head: str, key: str, rng=None, attention_impl: str = "auto",
                fresh_head: bool = True):
    """A model folder as `(module, params)` whose attention runs as `attention_impl`; an unset
    `key` is a ConfigError, a folder that is missing or cannot be loaded a ModelError naming it
    (and `key` when it is missing); `fresh_head` as `load_pretrained`'s."""
    require(path, key, "a model folder is needed")
    if not Path(path).is_dir():
        raise ModelError(path, f"no such model folder (`{key}`)")
    check_not_run_folder(path, key)
    return load_pretrained(path, head=head, rng=rng, attention_impl=attention_impl, fresh_head=fresh_head)


def load_reference(path: str, policy_module, tokenizer, key: str = "reference"):
    """The frozen reference folder `path` as `(module, params)`, refused unless it has the
    policy's architecture and vocabulary (`companion_models.check_reference`)."""
    module, params = load_folder(path, head="lm", key=key)
    check_reference(path, module, policy_module, tokenizer, key)
    return module, params


def load_reward_model(path: str, tokenizer, key: str, attention_impl: str = "auto",
                      source: str = "the policy's tokenizer"):
    """A reward model folder as `(module, params)`: its trained score head (a folder without
    one is a ModelError) and the run's vocabulary (`tokenizer`, described by `source`;
    `companion_models.check_reward_model`)."""
    module, params = load_folder(path, head="reward", key=key, attention_impl=attention_impl, fresh_head=False)
    check_reward_model(path, module, tokenizer, key, source)
    return module, params


def stage_mesh(config: MeshConfig):
    """A mesh over all devices, or over the first data*fsdp*tensor devices when no axis is -1."""
    sizes = (config.data, config.fsdp, config.tensor)
    devices = jax.devices()
    if -1 not in sizes and math.prod(sizes) < len(devices):
        devices = devices[: math.prod(sizes)]
    try:
        return make_mesh(config, devices)
    except ValueError as err:
        raise ConfigError(f"`mesh`: {err}") from None


def check_batch_shards(mesh, sizes: dict[str, int]) -> None:
    """A ConfigError naming the first config key in `sizes` (key -> global batch rows) that
    does not split evenly over the mesh's batch shards (`mesh.data x mesh.fsdp` devices)."""
    shards = math.prod(mesh.shape.get(axis, 1) for axis in BATCH_AXES)
    for key, size in sizes.items():
        if size % shards:
            layout = " x ".join(f"{mesh.shape.get(axis, 1)}" for axis in BATCH_AXES)
            below, above = size - size % shards, size + shards - size % shards
            choices = f"{below} or {above}" if below else f"{above}"
            example = f" (e.g. `mesh.data={math.gcd(size, shards)}`)" if mesh.shape.get("fsdp", 1) == 1 else ""
            raise ConfigError(
                f"`{key}` ({size}) must be a multiple of the mesh's {shards} batch shards "
                f"(`mesh.data` x `mesh.fsdp` = {layout}): set it to {choices}, or change `mesh`{example}")


def make_state(module, params, optim: OptimizerConfig, mesh):
    """A train state on `mesh` (FSDP-sharded when the mesh has an fsdp axis > 1), its step a
    replicated int32 array so a restored state has the same leaf types; and its shardings."""
    shardings = param_shardings(params, mesh)
    state = create_train_state(module, params, make_optimizer(optim), param_shardings=shardings)
    state = state.replace(step=jax.device_put(jnp.zeros((), jnp.int32), replicated(mesh)))
    return state, train_state_shardings(state, shardings)


def place(tree, mesh):
    """Host arrays -> device arrays split over the mesh's batch axes."""
    return shard_batch(jax.tree.map(np.asarray, tree), mesh)


def rng_key(seed: int, *stream: int):
    """A PRNG key for one purpose of a stage (streams keep uses independent)."""
    key = jax.random.PRNGKey(seed)
    for index in stream:
        key = jax.random.fold_in(key, index)
    return key


def stage_rng(seed: int, mesh):
    """The stage's RNG key in the checkpointed carry, replicated over `mesh`. Supervised steps
    draw nothing from it (no dropout; the data order comes from the seed and the data
    position), but every stage checkpoints one, so a stage that samples can use it."""
    return jax.device_put(rng_key(seed, 1), replicated(mesh))


SAVE_DTYPES = ("float32", "bfloat16", "float16")


def source_dtype(source: str | None) -> str:
    """The floating dtype the model folder `source` was saved in: its config.json `dtype`
    (transformers >= 4.56) or `torch_dtype`; float32 without a folder, or when it names none
    of float32 / bfloat16 / float16 (e.g. "auto" or no entry)."""
    if source is None:
        return "float32"
    try:
        config = json.loads((Path(source) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    for key in ("dtype", "torch_dtype"):
        name = str(config.get(key) or "").removeprefix("torch.")
        if name in SAVE_DTYPES:
            return name
    return "float32"


def export_dtype(save_dtype: str, source: str | None) -> str:
    """The storage dtype of an exported model: `save_dtype`, or with "source" the source
    folder's (`source_dtype`), so a bfloat16 checkpoint is exported at its own size."""
    if save_dtype == "source":
        return source_dtype(source)
    if save_dtype not in SAVE_DTYPES:
        raise ConfigError(f"save_dtype must be source, {', '.join(SAVE_DTYPES)}; got {save_dtype!r}")
    return save_dtype


def export_model(output_dir, module, params, tokenizer, source: str | None = None,
                 save_dtype: str = "source", sampling=None) -> Path:
    """Save the final model as a Hugging Face folder `<output_dir>/model` with the tokenizer
    (a causal LM also with `generation_config.json`: the `source` model folder's, with the
    tokenizer's ids and an RL stage's `sampling` EOS / pad ids, or a minimal one;
    `rlhf_jax.pipeline.generation_config`). The weights
    are stored in `export_dtype(save_dtype, source)` (config.json's `dtype` says which).
    Parameters holding a NaN or inf are refused (NonFiniteError) and nothing is written."""
    folder = Path(output_dir) / MODEL_DIR
    dtype = export_dtype(save_dtype, source)
    bad = nonfinite_leaves(params)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteError(f"refusing to export {folder}: NaN or inf in the parameters {shown}")
    host_params = multihost.fetch(params)  # a collective: every process gathers, one writes
    if jax.process_index() == 0:
        save_pretrained(folder, module, host_params, dtype=dtype, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
        tokenizer.save_pretrained(str(folder))
        if isinstance(module, CausalLM):
            write_generation_config(folder, tokenizer, source, sampling)
    return folder


def summary(stage: str, output_dir, result, extra: dict | None = None) -> dict:
    """The dict a stage's `run` returns, and a one-line report on stdout."""
    info = {
        "stage": stage, "output_dir": str(output_dir), "steps": result.step,
        "finished": result.finished, "seconds": round(result.seconds, 2),
        "steps_per_second": round(result.steps_per_second, 2), "resumed_from": result.resumed_from,
        "metrics": result.last_metrics, **(extra or {}),
    }
    if jax.process_index() == 0:
        state = "done" if result.finished else "stopped early (resume with --resume)"
        trained = (f"; {info['trainable_parameters']:,} trained parameters, optimizer state "
                   f"{info['optimizer_state_bytes'] / 2**20:.2f} MiB" if "optimizer_state_bytes" in info else "")
        speed = result.steps_per_second
        rate = (f" ({speed:.1f} steps/s after compilation)" if speed >= 0.1 else
                f" ({speed:.2g} steps/s after compilation)" if speed > 0 else "")  # 0: no step after compiling
        print(f"[{stage}] {state}: {result.step} steps in {result.seconds:.1f}s{rate}{trained} -> {output_dir}",
              flush=True)
    return info


def export_adapter(output_dir, module, state, base_path: str | None = None) -> Path:
    """Write a LoRA state's adapters (and fully trained `score` head) as the PEFT folder
    `<output_dir>/adapter`; `base_path` is recorded as `base_model_name_or_path`."""
    folder = Path(output_dir) / ADAPTER_DIR
    trainable = multihost.fetch(state.params)  # a collective: every process gathers, one writes
    if jax.process_index() == 0:
        save_peft_adapter(folder, module, trainable["lora"], state.apply_fn.model.lora,
                          modules=trainable.get("modules"),
                          base_model_name_or_path=None if base_path is None else str(Path(base_path).resolve()))
    return folder


def tree_bytes(tree) -> int:
    """Bytes of every array leaf of `tree` (global sizes of sharded arrays)."""
    return int(sum(np.size(x) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def finish_stage(stage: str, output_dir, result, module, state, tokenizer, extra: dict | None = None, *,
                 base_path: str | None = None, save_dtype: str = "source", sampling=None,
                 other_states=()) -> dict:
    """Export the trained model of `state` when the run finished (`model_dir` in the summary;
    with LoRA the merged model, and the PEFT adapter as `adapter_dir`; stored in
    `export_dtype(save_dtype, base_path)`; an RL stage's `sampling` ids in its
    generation_config.json); the summary, with the
    trained parameters' count (`trainable_parameters`: the adapters with LoRA) and the bytes of
    their optimizer state (`optimizer_state_bytes`), counting `other_states` too (PPO's value
    model)."""
    extra = dict(extra or {})
    states = (state, *other_states)
    extra["trainable_parameters"] = int(sum(np.size(x) for x in jax.tree.leaves([s.params for s in states])))
    extra["optimizer_state_bytes"] = tree_bytes([s.opt_state for s in states])
    if result.finished:
        extra["model_dir"] = str(export_model(output_dir, module, merged_params(state), tokenizer, base_path,
                                                save_dtype, sampling))
        if is_lora_state(state):
            extra["adapter_dir"] = str(export_adapter(output_dir, module, state, base_path))
    return summary(stage, output_dir, result, extra)


__all__ = [
    "MODEL_DIR", "ConfigRecord", "open_output_dir", "prepare_output_dir", "check_output_dir", "source_folders",
    "SOURCE_FOLDER_KEYS",
    "require", "check_not_run_folder", "check_same_vocabulary", "stage_tokenizer", "fresh_model_config",
    "build_model", "check_positions", "load_folder", "load_reference", "load_reward_model", "stage_mesh",
    "check_batch_shards", "make_state", "place", "rng_key", "stage_rng",
    "export_model", "export_dtype", "source_dtype", "SAVE_DTYPES", "export_adapter", "ADAPTER_DIR", "summary", "tree_bytes", "finish_stage",
]
