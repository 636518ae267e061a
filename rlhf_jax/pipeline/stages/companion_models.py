"""The models a stage reads next to the policy, checked against it before any use.

- A frozen `reference` runs through the policy's own model code (its log-probs come from the
  policy module's `apply`), so it must have the policy's architecture: every `ModelConfig`
  field that shapes the function (layers, sizes, norms, RoPE, windows, soft-caps, vocabulary
  size, ...) equal; the compute dtype, remat, attention implementation and special token ids
  may differ. Flax would otherwise read the first layers of a deeper model silently, or fail
  with a parameter-shape traceback.
- A `reward.path` / `reward_model` must bring its trained `score` head (a `*ForSequence
  Classification` folder, as `rlhf-jax reward` writes): a causal LM there would score with
  a random head.
- Both read the policy's token ids, so a tokenizer kept in their folder must have the
  policy's vocabulary (same tokens, same ids).
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

from rlhf_jax.models.errors import ModelError
from rlhf_jax.pipeline.tokenizer import load_tokenizer
from rlhf_jax.typed_config import ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# ModelConfig fields that do not change the function a checkpoint computes
_NOT_ARCHITECTURE = ("dtype", "param_dtype", "remat", "attention_impl", "attention_block_size",
                     "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings")


def folder_tokenizer(folder):
    """The tokenizer a model folder holds, or None (no tokenizer files, or unreadable ones)."""
    folder = Path(folder)
    if not folder.is_dir() or not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        with warnings.catch_warnings():  # transformers' notes on the folder's config.json
            warnings.simplefilter("ignore")
            return load_tokenizer(folder)
    except ModelError:
        return None


def architecture_differences(config, expected) -> list[str]:
    """`"field value (expected: value)"` for each architecture field of ModelConfig `config`
    that differs from `expected`'s."""
    return [f"{field.name} {getattr(config, field.name)!r} (policy: {getattr(expected, field.name)!r})"
            for field in dataclasses.fields(config)
            if field.name not in _NOT_ARCHITECTURE and getattr(config, field.name) != getattr(expected, field.name)]


def vocabulary_difference(own: dict, run: dict) -> str:
    """The first token (in id order) whose id differs between two vocabularies (token -> id),
    as `'a' is 7 here, 9 in the run's` (or missing from one of them)."""
    for token, index in sorted(own.items(), key=lambda item: item[1]):
        if run.get(token) != index:
            there = "missing" if token not in run else run[token]
            return f"{token!r} is {index} here, {there} in the run's"
    token, index = min(((t, i) for t, i in run.items() if t not in own), key=lambda item: item[1])
    return f"{token!r} ({index}) is missing here"


def check_vocabulary(folder, tokenizer, key: str, role: str, source: str = "the policy's tokenizer") -> None:
    """A ConfigError when `folder` (config key `key`) holds a tokenizer whose vocabulary is not
    `tokenizer`'s (the run's, described by `source`): the model (`role`) would read the run's
    token ids as other tokens. The error names the first token that differs."""
    own = folder_tokenizer(folder)
    if own is not None and own.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"`{key}` ({folder}): its tokenizer ({len(own)} tokens) is not {source} ({len(tokenizer)} tokens; "
            f"{vocabulary_difference(own.get_vocab(), tokenizer.get_vocab())}): the {role} would read the run's "
            f"token ids as other tokens; use a {role} trained with {source}")


def check_reference(folder, module, policy_module, tokenizer, key: str = "reference") -> None:
    """A ModelError naming `folder` (config key `key`) unless the loaded reference `module`
    has `policy_module`'s architecture; a ConfigError when its tokenizer differs."""
    differences = architecture_differences(module.config, policy_module.config)
    if differences:
        shown = ", ".join(differences[:4]) + (f" and {len(differences) - 4} more" if len(differences) > 4 else "")
        raise ModelError(folder, f"`{key}` must have the policy's architecture (it runs through the policy's "
                                 f"model code), but it has {shown}")
    check_vocabulary(folder, tokenizer, key, "reference")


def check_reward_model(folder, module, tokenizer, key: str, source: str = "the policy's tokenizer") -> None:
    """A ConfigError naming `key` when the reward model `folder` (loaded as `module`) cannot
    read the run's token ids (`tokenizer`, described by `source`): another tokenizer, or an
    embedding table smaller than it."""
    check_vocabulary(folder, tokenizer, key, "reward model", source)
    if module.config.vocab_size < len(tokenizer):
        raise ConfigError(f"`{key}` ({folder}) embeds {module.config.vocab_size} token ids, fewer than the "
                          f"policy's tokenizer's {len(tokenizer)}: it was not trained with that tokenizer")


__all__ = ["TOKENIZER_FILES", "folder_tokenizer", "architecture_differences", "check_vocabulary",
           "check_reference", "check_reward_model"]
