"""Training batches as frozen pytrees (`flax.struct.dataclass`).

Every field is an array whose leading axis is the batch, so a batch shards over the mesh's
data axes (`rlhf_jax.training.sharding.shard_batch`), splits into microbatches
(`accumulate_gradients`) and passes through `jax.jit` / `jax.shard_map` as one argument.
Optional fields are None when absent (None is an empty pytree, so it costs nothing).

Field names follow the arrays of `rlhf_jax.pipeline.data` (`input_ids`, `attention_mask`,
`loss_mask`, `chosen_input_ids`, ...), so `SFTBatch.from_arrays(batch_dict)` takes a
`BatchIterator` batch as it is; keys a batch does not use (`prompt_ids`, `row_index`,
`example_mask`, ...) are ignored.

Layout (`[B, T]`, right- or left-padded):
- `input_ids`: int token ids of prompt + response;
- `attention_mask`: 1 on real tokens, 0 on padding;
- `loss_mask`: 1 on the response tokens themselves, aligned with `input_ids` (the causal
  shift is the step's job: the logits at `t - 1` score the token at `t`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
from flax import struct

from rlhf_jax.ops.checks import check_rank, check_same_shape


def _pick(cls, arrays: Mapping[str, Any]):
    """`cls` from the entries of `arrays` named like its fields; other keys are ignored."""
    fields = cls.__dataclass_fields__
    missing = [name for name, field in fields.items()
               if name not in arrays and field.default is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{cls.__name__} needs arrays {missing}; got keys {sorted(arrays)}")
    return cls(**{name: arrays[name] for name in fields if name in arrays})


def _check_token_arrays(prefix: str, **arrays) -> None:
    for name, value in arrays.items():
        if value is not None:
            check_rank(value, 2, prefix + name)
    check_same_shape(**{prefix + name: value for name, value in arrays.items()})
    ids = arrays["input_ids"]
    if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
        raise ValueError(f"`{prefix}input_ids` must hold integer token ids, got dtype {jnp.result_type(ids)}")


def _check_rows(batch_size: int, **arrays) -> None:
    for name, value in arrays.items():
        if value is not None:
            check_rank(value, 1, name)
            if jnp.shape(value)[0] != batch_size:
                raise ValueError(f"`{name}` must have shape ({batch_size},), got {jnp.shape(value)}")


@struct.dataclass
class SFTBatch:
    """Supervised fine-tuning: the loss reads the tokens where `loss_mask` is 1."""

    input_ids: Any  # [B, T] int
    attention_mask: Any  # [B, T] 1 = real token
    loss_mask: Any  # [B, T] 1 = trained (response) token

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> "SFTBatch":
        return _pick(cls, arrays)

    def validate(self) -> None:
        """Raise ValueError unless the arrays are `[B, T]` of one shape with integer ids."""
        _check_token_arrays("", input_ids=self.input_ids, attention_mask=self.attention_mask,
                            loss_mask=self.loss_mask)


@struct.dataclass
class PreferenceBatch:
    """Pairs (prompt + chosen, prompt + rejected), both `[B, T]` with the same T.

    Used by `dpo_step` (loss masks required; reference log-probs optional, see
    `precompute_reference_logps`) and by `reward_step` (loss masks unused; `margin` optional).
    """

    chosen_input_ids: Any  # [B, T] int
    chosen_attention_mask: Any  # [B, T]
    rejected_input_ids: Any  # [B, T] int
    rejected_attention_mask: Any  # [B, T]
    chosen_loss_mask: Any = None  # [B, T] 1 on the chosen response tokens
    rejected_loss_mask: Any = None  # [B, T] 1 on the rejected response tokens
    ref_chosen_logps: Any = None  # [B] summed reference log-probs of the chosen responses
    ref_rejected_logps: Any = None  # [B] the same for the rejected responses
    margin: Any = None  # [B] reward-model margin per pair (Llama 2), or None

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> "PreferenceBatch":
        return _pick(cls, arrays)

    @property
    def batch_size(self) -> int:
        return jnp.shape(self.chosen_input_ids)[0]

    @property
    def has_reference_logps(self) -> bool:
        return self.ref_chosen_logps is not None and self.ref_rejected_logps is not None

    def validate(self, *, need_loss_masks: bool) -> None:
        """Raise ValueError on wrong ranks/shapes or missing loss masks."""
        _check_token_arrays(
            "chosen_", input_ids=self.chosen_input_ids, attention_mask=self.chosen_attention_mask,
            loss_mask=self.chosen_loss_mask,
        )
        _check_token_arrays(
            "rejected_", input_ids=self.rejected_input_ids, attention_mask=self.rejected_attention_mask,
            loss_mask=self.rejected_loss_mask,
        )
        check_same_shape(chosen_input_ids=self.chosen_input_ids, rejected_input_ids=self.rejected_input_ids)
        if need_loss_masks and (self.chosen_loss_mask is None or self.rejected_loss_mask is None):
            raise ValueError("this step needs `chosen_loss_mask` and `rejected_loss_mask` in the batch")
        if (self.ref_chosen_logps is None) != (self.ref_rejected_logps is None):
            raise ValueError("`ref_chosen_logps` and `ref_rejected_logps` must be given together")
        _check_rows(self.batch_size, ref_chosen_logps=self.ref_chosen_logps,
                    ref_rejected_logps=self.ref_rejected_logps, margin=self.margin)


@struct.dataclass
class KTOBatch:
    """Unpaired completions labelled desirable or undesirable (KTO, arXiv:2402.01306).

    `kl_*` (optional) hold mismatched (prompt, completion) pairs of the same shape, e.g. each
    prompt with the next row's completion; their log-ratio mean is KTO's reference point z0.
    Without them z0 is estimated from the batch's own log-ratios.
    """

    input_ids: Any  # [B, T] int
    attention_mask: Any  # [B, T]
    loss_mask: Any  # [B, T] 1 on the completion tokens
    is_desirable: Any  # [B] bool / 0-1
    ref_logps: Any = None  # [B] summed reference log-probs of the completions
    kl_input_ids: Any = None  # [B, T] mismatched pairs
    kl_attention_mask: Any = None  # [B, T]
    kl_loss_mask: Any = None  # [B, T]
    ref_kl_logps: Any = None  # [B] reference log-probs of the mismatched pairs

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> "KTOBatch":
        return _pick(cls, arrays)

    @property
    def batch_size(self) -> int:
        return jnp.shape(self.input_ids)[0]

    @property
    def has_kl_pairs(self) -> bool:
        return self.kl_input_ids is not None

    @property
    def has_reference_logps(self) -> bool:
        return self.ref_logps is not None and (not self.has_kl_pairs or self.ref_kl_logps is not None)

    def validate(self) -> None:
        """Raise ValueError on wrong ranks/shapes or a partial set of `kl_*` arrays."""
        _check_token_arrays("", input_ids=self.input_ids, attention_mask=self.attention_mask,
                            loss_mask=self.loss_mask)
        kl = (self.kl_input_ids, self.kl_attention_mask, self.kl_loss_mask)
        if any(x is None for x in kl) and any(x is not None for x in kl):
            raise ValueError("`kl_input_ids`, `kl_attention_mask` and `kl_loss_mask` must be given together")
        if self.has_kl_pairs:
            _check_token_arrays("kl_", input_ids=self.kl_input_ids, attention_mask=self.kl_attention_mask,
                                loss_mask=self.kl_loss_mask)
            check_same_shape(input_ids=self.input_ids, kl_input_ids=self.kl_input_ids)
        elif self.ref_kl_logps is not None:
            raise ValueError("`ref_kl_logps` is given but the batch has no `kl_input_ids`")
        _check_rows(self.batch_size, is_desirable=self.is_desirable, ref_logps=self.ref_logps,
                    ref_kl_logps=self.ref_kl_logps)


__all__ = ["SFTBatch", "PreferenceBatch", "KTOBatch"]
