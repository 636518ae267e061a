"""`--resume` against an output folder written by another run: refuse before anything is
overwritten.

A stage writes its resolved config to `<output_dir>/config.yaml`. Resuming reads that file
first: checkpoints of another stage (an `sft --resume` pointed at a DPO run's folder), or of
a run whose trained parameters have another structure (LoRA on or off, other adapter
settings, another fresh-model architecture, a model folder of another architecture), are a
`CheckpointError` naming the folder and the keys that differ, instead of a restore that fails
with orbax's tree listing or, worse, succeeds and silently continues the other run.

Settings that keep the structure (learning rate, steps, data, ...) may change between a run
and its resumption; `changed_settings` lists them (old -> new) for the warning the stage
prints before it keeps the earlier config.yaml as `config.<n>.yaml` and writes the new one
(`rlhf_jax.pipeline.stages.stage_setup.prepare_output_dir`).
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from rlhf_jax.pipeline.errors import CheckpointError

# The section each stage's config has and no other stage's (the reward stage's `reward` is
# shared with the RL stages, which also have `policy`).
_STAGE_SECTIONS = ("ppo", "grpo", "dpo", "sft")
# Keys of one invocation rather than of the run: they may differ on resume without a warning,
# and a config.yaml read back for `--resume` (the command without `--config`) resets them.
PER_INVOCATION_KEYS = ("train.stop_after",)
# Keys that decide the structure of the checkpointed train state.
_STRUCTURE_KEYS = ("lora", "model.init", "policy.init")
# Model folders whose config.json is compared (a moved folder of the same model may resume).
_FOLDER_KEYS = ("model.path", "policy.path")
# config.json fields that decide the shapes of a model's parameters.
_ARCHITECTURE_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                        "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings",
                        "n_embd", "n_layer", "n_head", "n_inner")


def _architecture(folder) -> dict | None:
    """The shape-deciding fields of a model folder's config.json (None: none readable)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        return None
    return {name: config.get(name) for name in _ARCHITECTURE_FIELDS} if isinstance(config, dict) else None


def stage_of(config: dict) -> str | None:
    """The stage that wrote a resolved config (a dict), None when it cannot be told."""
    if "stages" in config:  # the quickstart's, which holds a section per stage
        return "quickstart"
    if "policies" in config:  # eval's, whose `reward` section holds reward functions
        return "eval"
    for name in _STAGE_SECTIONS:
        if name in config:
            return name
    if "reward" in config and "policy" not in config:
        return "reward"
    return None


def _flat(value, prefix: str) -> dict:
    if isinstance(value, dict) and value:
        return {key: item for name, sub in value.items() for key, item in _flat(sub, f"{prefix}.{name}").items()}
    return {prefix: value}


def _leaves(config: dict) -> dict:
    """A config's leaves by dotted key (an empty mapping or a list is one leaf)."""
    return {key: item for name, sub in config.items() for key, item in _flat(sub, str(name)).items()}


def _lookup(config: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(config, dict):
            return None
        config = config.get(part)
    return config


def checkpointed_config(output_dir: str | Path) -> dict | None:
    """The config.yaml (a dict) of the run whose checkpoints are in `output_dir`; None when the
    folder holds no checkpoint or no readable config.yaml."""
    output_dir = Path(output_dir)
    saved_file = output_dir / "config.yaml"
    checkpoints = output_dir / "checkpoints"
    if not (saved_file.is_file() and checkpoints.is_dir() and any(checkpoints.iterdir())):
        return None
    try:
        saved = yaml.safe_load(saved_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return saved if isinstance(saved, dict) else None


_ABSENT = object()


def _shown(value) -> str:
    if value is _ABSENT:
        return "(absent)"
    if value is None or isinstance(value, (bool, list, dict)):
        return json.dumps(value)  # null, true, ["a.jsonl"], {"rank": 4}
    return str(value)


def changed_settings(saved: dict, config: dict) -> list[str]:
    """`key old -> new` for every setting (a dotted key, down to the leaves; lists whole) whose
    value differs between the checkpointed run's config.yaml `saved` and the resolved `config`
    (both dicts as YAML reads them), in `config`'s key order, `PER_INVOCATION_KEYS` left out."""
    old, new = _leaves(saved), _leaves(config)
    changes = []
    for key in [*new, *(key for key in old if key not in new)]:
        if key in PER_INVOCATION_KEYS or old.get(key, _ABSENT) == new.get(key, _ABSENT):
            continue
        changes.append(f"{key} {_shown(old.get(key, _ABSENT))} -> {_shown(new.get(key, _ABSENT))}")
    return changes


def check_resume(output_dir: str | Path, config: dict, stage: str) -> None:
    """Raise `CheckpointError` when `output_dir` holds checkpoints that `stage` with the
    resolved `config` (a dict) cannot continue (see the module docstring)."""
    output_dir = Path(output_dir)
    saved = checkpointed_config(output_dir)
    if saved is None:
        return  # nothing to resume, or no readable record (the restore checks the checkpoint's structure)
    saved_stage = stage_of(saved)
    if saved_stage is not None and saved_stage != stage:
        raise CheckpointError(
            f"`--resume`: {output_dir} holds the checkpoints of a `{saved_stage}` run (see its config.yaml), "
            f"which `rlhf-jax {stage}` cannot continue; give this run another `output_dir`")
    differences = []
    for key in _STRUCTURE_KEYS:
        old, new = _lookup(saved, key), _lookup(config, key)
        if (old is None) != (new is None):
            differences.append(f"{key}: {'set' if old is not None else 'absent'} in the checkpointed run, "
                               f"{'set' if new is not None else 'absent'} now")
            continue
        old, new = _flat(old, key), _flat(new, key)
        for name in sorted(set(old) | set(new)):
            if old.get(name) != new.get(name):
                differences.append(f"{name}: {old.get(name)!r} in the checkpointed run, {new.get(name)!r} now")
    for key in _FOLDER_KEYS:
        old_folder, new_folder = _lookup(saved, key), _lookup(config, key)
        if old_folder and new_folder and old_folder != new_folder:
            old, new = _architecture(old_folder), _architecture(new_folder)
            if old is not None and new is not None and old != new:
                fields = ", ".join(f"{name} {old[name]!r} -> {new[name]!r}" for name in old if old[name] != new[name])
                differences.append(f"{key}: {old_folder} in the checkpointed run, {new_folder} now, "
                                   f"another architecture ({fields})")
    if differences:
        raise CheckpointError(
            f"`--resume`: the checkpoints in {output_dir} were written with other settings that shape the "
            f"trained parameters ({'; '.join(differences)}); resume with the run's own settings "
            f"(its config.yaml) or give this run another `output_dir`")


__all__ = ["check_resume", "stage_of", "checkpointed_config", "changed_settings", "PER_INVOCATION_KEYS"]
