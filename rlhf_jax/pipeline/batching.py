"""Batches of a `TokenizedData`: seeded shuffle, resumable position, one slice per process.

`BatchIterator` cuts the padded arrays of `rlhf_jax.pipeline.data` into endless batches of
NumPy arrays; `DataPosition` is the part of its state a checkpoint saves.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rlhf_jax.pipeline.data import DataConfig, TokenizedData


@dataclass(frozen=True)
class DataPosition:
    """Where a `BatchIterator` stands: `index` batches of epoch `epoch` are consumed."""

    epoch: int = 0
    index: int = 0


class BatchIterator:
    """Endless, deterministic batches of a `TokenizedData`.

    Epoch `e` visits the rows in the order `default_rng([seed, e]).permutation(N)` (or in file
    order when `shuffle=False`). `batch_size` is the GLOBAL batch: process `p` of `P` gets
    rows `[p * batch_size / P, (p + 1) * batch_size / P)` of each global batch, so the global
    batch does not depend on the number of processes. With `drop_last=False` the last batch of
    an epoch is completed (`fill`) with empty rows (`"empty"`: all masks 0, `example_mask` 0,
    `row_index` -1; for one pass over every row, e.g. evaluation, which drops them) or with the
    epoch's first rows again (`"repeat"`, for training: every row of a batch is real, so a
    pair loss and its accuracy average real pairs, not ties of empty ones; a few rows count
    twice in that epoch).

    Each batch is a dict of NumPy arrays: the data's arrays for the rows, plus `row_index`
    [b] int32 (row in the data, for its text columns) and `example_mask` [b] float32.
    With `bucket_multiple=k > 0` the response arrays are trimmed to the batch's longest
    response (over the global batch) rounded up to a multiple of `k`, prompts likewise from
    the left; chosen and rejected share one length.

    `position` is a `DataPosition`; pass it back (`position=` or `restore`) to continue
    exactly where a checkpoint left off.
    """

    def __init__(
        self,
        data: TokenizedData,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        fill: str = "empty",
        bucket_multiple: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        position: DataPosition = DataPosition(),
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(
                f"need 0 <= process_index < process_count, got {process_index} and {process_count}"
            )
        if batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} must be divisible by process_count {process_count}")
        if fill not in ("empty", "repeat"):
            raise ValueError(f"fill must be 'empty' or 'repeat', got {fill!r}")
        if bucket_multiple < 0:
            raise ValueError(f"bucket_multiple must be >= 0, got {bucket_multiple}")
        if drop_last and len(data) < batch_size:
            raise ValueError(
                f"the data has {len(data)} rows, fewer than one batch of {batch_size} (drop_last=True)"
            )
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.fill = fill
        self.bucket_multiple = bucket_multiple
        self.process_index = process_index
        self.process_count = process_count
        self.restore(position)

    @classmethod
    def from_config(cls, data: TokenizedData, config: DataConfig, batch_size: int, **options):
        """A training iterator using `config.shuffle`, `config.drop_last` (the last batch
        completed with repeated rows) and `config.bucket_multiple`; `options` are the remaining
        keyword arguments (seed, process_index, ...)."""
        return cls(
            data,
            batch_size,
            shuffle=config.shuffle,
            drop_last=config.drop_last,
            fill="repeat",
            bucket_multiple=config.bucket_multiple,
            **options,
        )

    @property
    def batches_per_epoch(self) -> int:
        rows = len(self.data)
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    @property
    def position(self) -> DataPosition:
        return DataPosition(self._epoch, self._index)

    def restore(self, position: DataPosition) -> None:
        """Continue from `position` (as returned by `position`)."""
        if not 0 <= position.index <= self.batches_per_epoch or position.epoch < 0:
            raise ValueError(f"position {position} is outside 0..{self.batches_per_epoch} batches per epoch")
        self._epoch, self._index = position.epoch, position.index
        self._order = self._epoch_order(position.epoch)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.data))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.data))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._index >= self.batches_per_epoch:
            self._epoch, self._index = self._epoch + 1, 0
            self._order = self._epoch_order(self._epoch)
        start = self._index * self.batch_size
        global_rows = self._order[start : start + self.batch_size]
        self._index += 1
        missing = self.batch_size - len(global_rows)
        filler = (self._order[np.arange(missing) % len(self._order)] if self.fill == "repeat"
                  else np.full(missing, -1))
        global_rows = np.concatenate([global_rows, filler])
        share = self.batch_size // self.process_count
        rows = global_rows[self.process_index * share : (self.process_index + 1) * share]
        batch = {
            name: _take_rows(array, rows, self.data.pad_token_id if name.endswith("_ids") else 0)
            for name, array in self.data.arrays.items()
        }
        batch["row_index"] = rows.astype(np.int32)
        batch["example_mask"] = (rows >= 0).astype(np.float32)
        if self.bucket_multiple:
            batch = _trim_to_bucket(batch, self.data.arrays, global_rows, self.bucket_multiple)
        return batch

    def epoch_batches(self):
        """The remaining batches of the current epoch (advancing the position)."""
        while self._index < self.batches_per_epoch:
            yield next(self)


def _take_rows(array: np.ndarray, rows: np.ndarray, fill: int) -> np.ndarray:
    """`array[rows]`, where a row index of -1 gives a row of `fill`."""
    taken = array[np.maximum(rows, 0)]
    taken[rows < 0] = fill
    return taken


def _trim_to_bucket(batch, arrays, global_rows, multiple: int) -> dict[str, np.ndarray]:
    """Cut padding columns that no row of the global batch uses, keeping a multiple of `multiple`."""
    real = global_rows[global_rows >= 0]

    def bucket(needed: int, full: int) -> int:
        return min(full, max(multiple, -(-needed // multiple) * multiple))

    prompt_full = arrays["prompt_mask"].shape[1]
    prompt_needed = int(arrays["prompt_mask"][real].sum(axis=1).max(initial=1))
    keep = bucket(prompt_needed, prompt_full)
    trimmed = dict(batch)
    for name in ("prompt_ids", "prompt_mask"):
        trimmed[name] = batch[name][:, prompt_full - keep :]
    if "response_mask" in arrays:
        response_full = arrays["response_mask"].shape[-1]
        needed = int(arrays["response_mask"][real].sum(axis=-1).max(initial=1))
        keep = bucket(needed, response_full)
        for name in ("response_ids", "response_mask", "loss_mask"):
            if name in batch:
                trimmed[name] = batch[name][..., :keep]
    return trimmed
