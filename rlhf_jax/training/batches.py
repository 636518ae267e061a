"""Training batches of the supervised and preference steps, in the one `LMBatch` layout.

    prompt_ids, prompt_mask       [B, P]     left-padded prompts (each row's last column real)
    response_ids, response_mask   [B, N, R]  right-padded responses, N per prompt

(see `rlhf_jax.training.logprobs`), plus what each step needs besides:

| batch | N | extra fields |
|---|---|---|
| `SFTBatch` | 1 | `loss_mask [B, 1, R]` (optional: trained tokens, default `response_mask`) |
| `PreferenceBatch` | 2 (chosen, rejected) | `ref_logps [B, 2]`, `margin [B]` (both optional) |
| `KTOBatch` | 1 | `is_desirable [B]`; optional `ref_logps [B]`, mismatched completions `kl_response_ids`/`kl_response_mask [B, 1, R]` for the same prompts and their `ref_kl_logps [B]` |

Every field is an array whose leading axis is the batch, so a batch shards over the mesh's
data axes (`rlhf_jax.training.sharding.shard_batch`), splits into microbatches
(`accumulate_gradients`) and passes through `jax.jit` / `jax.shard_map` as one argument.
Optional fields are None when absent (None is an empty pytree, so it costs nothing).

Field names are those of the arrays of `rlhf_jax.pipeline.data`, so
`SFTBatch.from_arrays(batch_dict)` takes a `BatchIterator` batch as it is; keys a batch does
not use (`row_index`, `example_mask`, ...) are ignored.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
from flax import struct

from rlhf_jax.ops.checks import check_rank, check_same_shape
from rlhf_jax.training.logprobs import LMBatch


def _pick(cls, arrays: Mapping[str, Any]):
    """`cls` from the entries of `arrays` named like its fields; other keys are ignored."""
    fields = cls.__dataclass_fields__
    missing = [name for name, field in fields.items()
               if name not in arrays and field.default is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{cls.__name__} needs arrays {missing}; got keys {sorted(arrays)}")
    return cls(**{name: arrays[name] for name in fields if name in arrays})


def _check_shape(name: str, value, shape: tuple) -> None:
    if value is not None and tuple(jnp.shape(value)) != tuple(shape):
        raise ValueError(f"`{name}` must have shape {tuple(shape)}, got {tuple(jnp.shape(value))}")


def _check_responses(batch: LMBatch, expected: int, what: str) -> None:
    LMBatch.validate(batch)
    if batch.num_responses != expected:
        raise ValueError(f"{type(batch).__name__} holds {what}: `response_ids` must be [B, {expected}, R], "
                         f"got shape {tuple(jnp.shape(batch.response_ids))}")


@struct.dataclass
class SFTBatch(LMBatch):
    """Supervised fine-tuning: one response per prompt; the loss reads the tokens where
    `loss_mask` is 1 (a multi-turn conversation's user turns are real response tokens that
    are not trained); without `loss_mask` every real response token is trained."""

    loss_mask: Any = None  # [B, 1, R] 1 = trained token (a subset of response_mask)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> "SFTBatch":
        return _pick(cls, arrays)

    @property
    def trained_mask(self):
        """`[B, 1, R]` float32: `loss_mask` (or `response_mask`) where the response is real."""
        real = jnp.asarray(self.response_mask, jnp.float32)
        return real if self.loss_mask is None else real * jnp.asarray(self.loss_mask, jnp.float32)

    def validate(self) -> None:
        """Raise ValueError unless the arrays have the layout above."""
        _check_responses(self, 1, "one response per prompt")
        if self.loss_mask is not None:
            check_same_shape(response_ids=self.response_ids, loss_mask=self.loss_mask)


@struct.dataclass
class PreferenceBatch(LMBatch):
    """Preference pairs: `response_ids[:, 0]` is the chosen response, `[:, 1]` the rejected
    one, after the same prompt. Used by `preference_step` (reference log-probs optional, see
    `precompute_reference_logps`) and by `reward_step` (`margin` optional)."""

    ref_logps: Any = None  # [B, 2] summed reference log-probs of (chosen, rejected)
    margin: Any = None  # [B] reward-model margin per pair (Llama 2), or None

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> "PreferenceBatch":
        return _pick(cls, arrays)

    @property
    def has_reference_logps(self) -> bool:
        return self.ref_logps is not None

    def validate(self) -> None:
        """Raise ValueError on a wrong layout or wrongly shaped reference log-probs / margin."""
        _check_responses(self, 2, "pairs (chosen, rejected)")
        _check_shape("ref_logps", self.ref_logps, (self.batch_size, 2))
        _check_shape("margin", self.margin, (self.batch_size,))


@struct.dataclass
class KTOBatch(LMBatch):
    """Unpaired completions labelled desirable or undesirable (KTO, arXiv:2402.01306).

    `kl_response_ids`/`kl_response_mask` (optional) hold a mismatched completion for each
    prompt (e.g. the next row's completion); the mean log-ratio of those (prompt, completion)
    pairs is KTO's reference point z0. Without them z0 is estimated from the batch's own
    log-ratios.
    """

    is_desirable: Any = None  # [B] bool / 0-1 (required)
    ref_logps: Any = None  # [B] summed reference log-probs of the completions
    kl_response_ids: Any = None  # [B, 1, R'] mismatched completions of the same prompts
    kl_response_mask: Any = None  # [B, 1, R']
    ref_kl_logps: Any = None  # [B] reference log-probs of the mismatched pairs

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> "KTOBatch":
        return _pick(cls, arrays)

    @property
    def has_kl_pairs(self) -> bool:
        return self.kl_response_ids is not None

    @property
    def has_reference_logps(self) -> bool:
        return self.ref_logps is not None and (not self.has_kl_pairs or self.ref_kl_logps is not None)

    def kl_batch(self) -> LMBatch:
        """The mismatched pairs as an `LMBatch` (the same prompts, the KL completions)."""
        return LMBatch(self.prompt_ids, self.prompt_mask, self.kl_response_ids, self.kl_response_mask)

    def validate(self) -> None:
        """Raise ValueError on a wrong layout, a missing label or a partial set of `kl_*` arrays."""
        _check_responses(self, 1, "one completion per prompt")
        if self.is_desirable is None:
            raise ValueError("KTOBatch needs `is_desirable` [B]")
        if (self.kl_response_ids is None) != (self.kl_response_mask is None):
            raise ValueError("`kl_response_ids` and `kl_response_mask` must be given together")
        if self.has_kl_pairs:
            check_rank(self.kl_response_ids, 3, "kl_response_ids")
            _check_responses(self.kl_batch(), 1, "one mismatched completion per prompt")
        elif self.ref_kl_logps is not None:
            raise ValueError("`ref_kl_logps` is given but the batch has no `kl_response_ids`")
        for name in ("is_desirable", "ref_logps", "ref_kl_logps"):
            _check_shape(name, getattr(self, name), (self.batch_size,))


__all__ = ["SFTBatch", "PreferenceBatch", "KTOBatch"]
