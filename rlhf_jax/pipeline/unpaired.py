"""KTO's unpaired rows (Ethayarajh et al. 2024, arXiv:2402.01306) from loaded data.

KTO trains on single completions labelled desirable or undesirable. `unpaired_data` turns a
loaded `TokenizedData` into such rows, from either of TRL's two layouts:

- labelled completions (TRL's unpaired preference format): `prompt`, `completion` and a bool
  `label` per row (loaded as SFT rows; the label is the row's `label` column);
- preference pairs: each pair gives two rows, its chosen completion (desirable) and its
  rejected one (undesirable), as TRL's `unpair_preference_dataset` does.

KTO's reference point `z0` estimates `KL(pi || pi_ref)` from completions paired with prompts
they do not belong to. Each row carries one such completion, fixed when the data is loaded
(so the reference log-probs of every row and of its mismatched pair are computed once): the
next row's completion for labelled rows, the next pair's (same slot) for unpaired pairs.

Arrays (`TokenizedData.arrays`, kind "kto"), in the layout of `rlhf_jax.pipeline.data` with
two responses per prompt, so the log-prob path runs each prompt once for both:

    prompt_ids, prompt_mask       [rows, P]
    response_ids, response_mask   [rows, 2, R]   slot 0: the row's completion; slot 1: the
                                                  mismatched completion (for z0)
    is_desirable                  [rows]         float32, 1 desirable / 0 undesirable
"""
from __future__ import annotations

import numpy as np

from rlhf_jax.pipeline.data import TokenizedData
from rlhf_jax.pipeline.data_formats import DataError


def unpaired_data(data: TokenizedData) -> TokenizedData:
    """KTO rows (module docstring) from preference pairs or labelled completions; a DataError
    names the file and row of a missing or non-bool `label`, or of a multi-turn conversation
    (untrained user text inside the completion: KTO scores whole completions, so give `prompt`
    + `completion`)."""
    arrays = data.arrays
    if data.kind == "preference":
        count = len(data)
        twice = lambda x: np.repeat(x, 2, axis=0)
        responses = {name: arrays[name].reshape(2 * count, 1, -1) for name in ("response_ids", "response_mask")}
        desirable = np.tile(np.array([1.0, 0.0], np.float32), count)
        prompts = {name: twice(arrays[name]) for name in ("prompt_ids", "prompt_mask")}
        shift = 2  # the next pair's completion of the same slot: another prompt's
        columns = {name: [value for value in values for _ in range(2)] for name, values in data.columns.items()}
        sources = [source for source in data.sources for _ in range(2)]
    elif data.kind == "sft":
        desirable = _labels(data)
        _check_whole_completions(data)
        responses = {name: arrays[name] for name in ("response_ids", "response_mask")}
        prompts = {name: arrays[name] for name in ("prompt_ids", "prompt_mask")}
        shift, columns, sources = 1, dict(data.columns), list(data.sources)
    else:
        raise DataError(f"{data.files}: KTO (dpo.kind: kto) takes preference pairs (prompt/chosen/rejected) or "
                        f"labelled completions (prompt/completion/label), got {data.kind} data")
    mismatched = {name: np.roll(value, -shift, axis=0) for name, value in responses.items()}
    kto_arrays = {
        **prompts,
        **{name: np.concatenate([responses[name], mismatched[name]], axis=1) for name in responses},
        "is_desirable": desirable,
    }
    return TokenizedData("kto", kto_arrays, columns, sources, data.stats, data.pad_token_id)


def _labels(data: TokenizedData) -> np.ndarray:
    labels = data.columns.get("label")
    if labels is None:
        raise DataError(f"{data.files}: KTO rows of prompt/completion need a bool `label` (true: desirable, "
                        f"false: undesirable), as in TRL's unpaired preference format; or give "
                        f"prompt/chosen/rejected pairs")
    for (file, row), label in zip(data.sources, labels):
        if not isinstance(label, bool):
            raise DataError(f"{file} row {row}: `label` must be true (desirable) or false (undesirable), "
                            f"got {label!r}")
    return np.asarray(labels, np.float32)


def _check_whole_completions(data: TokenizedData) -> None:
    if "loss_mask" not in data.arrays:
        return
    trained = (data.arrays["response_mask"][:, 0] > 0) & (data.arrays["loss_mask"][:, 0] > 0)
    # untrained text between trained text: a later user turn (template markup only leads or trails)
    after_first = np.cumsum(trained, axis=1) > 0
    before_last = np.cumsum(trained[:, ::-1], axis=1)[:, ::-1] > 0
    gap = np.any(after_first & before_last & ~trained, axis=1)
    if gap.any():
        file, row = data.sources[int(np.argmax(gap))]
        raise DataError(f"{file} row {row}: KTO scores whole completions, but this row's completion has "
                        f"untrained text (a `messages` conversation); give `prompt` (the earlier messages) "
                        f"and `completion` (the assistant message) instead")


__all__ = ["unpaired_data"]
