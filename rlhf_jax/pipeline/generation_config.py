"""`generation_config.json` of an exported model folder (`<output_dir>/model`).

transformers' `generate` reads a causal LM's default generation settings (stop and pad ids,
sampling defaults) from this file next to `config.json`. An exported folder gets:

- the source model folder's `generation_config.json` when it has one (its sampling defaults
  kept), with `bos_token_id` / `eos_token_id` / `pad_token_id` made those of the tokenizer
  the model was trained with (the ids `config.json` records); an EOS list that already holds
  the tokenizer's EOS (chat models that stop at several ids) is kept as it is;
- otherwise a minimal one with the tokenizer's BOS / EOS / pad ids, as transformers writes
  for a model without one (`GenerationConfig.from_model_config`).

An RL stage that sampled with an EOS other than the tokenizer's (`<algo>.sampling.eos_token_id`,
e.g. a chat model's end-of-turn token) trained its policy to stop there: its stop ids come
first in the exported EOS list, followed by the ids above, and its pad id is the file's.

`stop_ids` reads the other way: the ids a model folder's responses stop at, which the RL
stages sample with and `rlhf-jax eval` generates with by default.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from transformers import GenerationConfig

GENERATION_CONFIG = "generation_config.json"
_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _tokenizer_ids(tokenizer) -> dict:
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    return {key: value for key, value in ids.items() if value is not None}


def _source_settings(source) -> dict | None:
    """The source folder's generation_config.json as a dict (None: none, or unreadable)."""
    if source is None or not (Path(source) / GENERATION_CONFIG).is_file():
        return None
    path = Path(source) / GENERATION_CONFIG
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        warnings.warn(f"{path} is unreadable ({error}); the exported model gets a minimal "
                      f"{GENERATION_CONFIG} with the tokenizer's ids instead", stacklevel=2)
        return None
    return settings if isinstance(settings, dict) else None


def _as_list(ids) -> list:
    return [] if ids is None else list(ids) if isinstance(ids, (list, tuple)) else [ids]


def stop_ids(tokenizer, folder=None) -> int | tuple[int, ...]:
    """The ids a model's responses stop at: the tokenizer's EOS, then the other EOS ids of
    `<folder>/generation_config.json` (transformers' `generate` stops at any of them; chat
    models list their end-of-turn token there, e.g. Gemma's `<end_of_turn>`). One id is
    returned as an int. Ids outside the tokenizer's vocabulary are left out with a warning."""
    stops = [tokenizer.eos_token_id]
    settings = _source_settings(folder) or {}
    for stop in _as_list(settings.get("eos_token_id")):
        if isinstance(stop, bool) or not isinstance(stop, int) or not 0 <= stop < len(tokenizer):
            warnings.warn(f"{Path(folder) / GENERATION_CONFIG}: EOS id {stop!r} is not an id of the tokenizer's "
                          f"vocabulary (0..{len(tokenizer) - 1}); responses do not stop at it", stacklevel=2)
        elif stop not in stops:
            stops.append(stop)
    return stops[0] if len(stops) == 1 else tuple(stops)


def _with_sampling_ids(ids: dict, sampling) -> dict:
    """`ids` with the stop ids an RL stage sampled with first in the EOS list and its pad id."""
    eos, pad = getattr(sampling, "eos_token_id", None), getattr(sampling, "pad_token_id", None)
    if eos is not None:
        first = _as_list(eos)
        stops = first + [stop for stop in _as_list(ids.get("eos_token_id")) if stop not in first]
        ids["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    if pad is not None:
        ids["pad_token_id"] = pad
    return ids


def write_generation_config(folder, tokenizer, source=None, sampling=None) -> Path:
    """Write `<folder>/generation_config.json` (module docstring): from the `source` model
    folder's when it has one, else minimal; ids from `tokenizer`, and from the RL stage's
    `sampling` config (`SamplingConfig`) when given. Returns the file."""
    folder = Path(folder)
    ids = _tokenizer_ids(tokenizer)
    settings = _source_settings(source)
    if settings is not None:
        eos = settings.get("eos_token_id")
        if isinstance(eos, list) and ids.get("eos_token_id") in eos:
            ids["eos_token_id"] = eos
    ids = _with_sampling_ids(ids, sampling)
    if settings is None:
        GenerationConfig(**ids).save_pretrained(str(folder))
        return folder / GENERATION_CONFIG
    settings.update(ids)
    (folder / GENERATION_CONFIG).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return folder / GENERATION_CONFIG


__all__ = ["GENERATION_CONFIG", "stop_ids", "write_generation_config"]
