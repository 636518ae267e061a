"""Datasets: local JSON / JSONL / parquet files -> fixed-shape padded NumPy arrays.

Files are read with Hugging Face `datasets` (`load_dataset("json" | "parquet", data_files=...)`,
or `load_from_disk` for a folder written by `Dataset.save_to_disk`);
row formats are described in `rlhf_jax.pipeline.data_formats`. Tokenisation uses the model
folder's tokenizer:

- string rows: `prompt_ids = tokenizer(prompt)` (with the tokenizer's own special tokens, e.g.
  BOS), `response_ids = tokenizer(response, add_special_tokens=False) + [eos]` (EOS is not
  appended twice when the text already ends with it). Prompt and response are tokenised
  separately and concatenated, so the response boundary is exact. A `text` row (language
  modeling) is a string row with an empty prompt: `tokenizer("")` (the BOS alone, or nothing).
- conversational rows: the chat template renders the text (see `data_formats`), with
  `data.chat_template_kwargs` and the row's own `chat_template_kwargs` (TRL's column, e.g.
  `{"enable_thinking": false}` for Qwen3; not passed to reward functions); it is tokenised
  without extra special tokens; EOS is appended (and trained) only when the rendered response
  holds none, so every response ends with it (a chat model's end-of-turn token, e.g. Gemma's
  `<end_of_turn>`, is then followed by the EOS). For SFT rows, a template with
  `{% generation %}` blocks marks the trained text (the character spans of transformers'
  `render_jinja_template(..., return_assistant_tokens_mask=True)`, which
  `apply_chat_template` turns into its `assistant_masks`), plus that appended EOS; the
  trained and untrained segments are tokenised the same way.

Lengths and padding (shapes never depend on the data, so jit compiles once): the arrays
are in the one LM batch layout of `rlhf_jax.training.logprobs.LMBatch`:

- a prompt longer than `max_prompt_length` tokens is a malformed row;
- a prompt of zero tokens (e.g. an SFT conversation that opens with the assistant, with a
  tokenizer that adds no BOS) takes the first token of its response(s) as its prompt, since
  nothing predicts a sequence's first token anyway; a preference pair whose two responses
  start with different tokens then is a malformed row, and so is a response that this
  leaves empty;
- a response longer than `max_response_length` tokens keeps its first `max_response_length`
  tokens (its EOS may be cut; `DataStats.num_truncated` counts these);
- prompts are LEFT-padded to `max_prompt_length` (generation appends on the right; each
  row's last prompt column is real), responses RIGHT-padded to `max_response_length`.
  The pad value is the tokenizer's pad id (its EOS id if it has none); masks say what is real.

Arrays (`TokenizedData.arrays`, first axis = rows; P = max_prompt_length,
R = max_response_length):

    prompt_ids, prompt_mask         [rows, P]     int32, left-padded (every kind)
    response_ids, response_mask     [rows, N, R]  int32, right-padded: N = 1 (sft, the
                                                  completion), N = 2 (preference: chosen, rejected)
    loss_mask                       [rows, 1, R]  float32, sft: 1 on the trained tokens (a
                                                  conversation's assistant turns)

The prompt is never trained; `loss_mask` is 1 on the trained response tokens themselves
(the log-prob path scores token j of a response with the state before it).

Malformed rows raise `DataError("<file> row <n>: <problem>")` (rows counted from 1; blank
lines of a JSONL file are not rows), or with `skip_invalid=True` are skipped and counted in
`DataStats`. `rlhf_jax.pipeline.batching` cuts the arrays into batches.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from rlhf_jax.pipeline.data_formats import (
    FORMATS,
    DataError,
    RenderedRow,
    RowError,
    check_kind,
    detect_format,
    read_rows,
    render_row,
    response_names,
)

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Where a stage's data lives and how it is cut (lives under `data:` in the YAML)."""

    train_files: list[str] = field(default_factory=list)  # .json / .jsonl / .parquet files
    eval_files: list[str] = field(default_factory=list)  # held-out files (same format)
    format: Literal["auto", "preference", "prompt", "sft"] = "auto"  # auto: from the columns
    max_prompt_length: int = 64  # longer prompts are malformed rows
    max_response_length: int = 64  # longer responses are truncated
    skip_invalid: bool = False  # skip and count malformed rows instead of failing
    shuffle: bool = True  # reshuffle every epoch (seeded)
    drop_last: bool = True  # drop the last incomplete batch (else complete it with the epoch's first rows)
    bucket_multiple: int = 0  # 0: fixed max lengths; k: trim batches to a multiple of k
    # keyword arguments of the chat template for every conversational row (e.g. Qwen3's
    # {enable_thinking: false}); a row's own `chat_template_kwargs` (TRL's column) adds to them
    chat_template_kwargs: dict = field(default_factory=dict)
    # SFT rows: train only the assistant's text (`messages`: its turns; a template's
    # {% generation %} blocks when it has them). false: TRL's default, a `messages` row's whole
    # conversation and a `prompt` + `completion` row's whole completion
    assistant_only_loss: bool = True


TEMPLATE_KWARGS = "chat_template_kwargs"  # the per-row column of chat-template arguments (TRL's)


@dataclass
class DataStats:
    """What loading did: rows read, kept, skipped (with the first reasons), truncated."""

    num_rows: int = 0
    num_used: int = 0
    num_skipped: int = 0
    num_truncated: int = 0
    skipped_reasons: list[str] = field(default_factory=list)  # the first few messages

    def add(self, other: "DataStats") -> None:
        self.num_rows += other.num_rows
        self.num_used += other.num_used
        self.num_skipped += other.num_skipped
        self.num_truncated += other.num_truncated
        self.skipped_reasons.extend(other.skipped_reasons[: max(0, 5 - len(self.skipped_reasons))])


@dataclass
class TokenizedData:
    """A tokenised dataset: padded arrays, original text columns and where rows came from."""

    kind: str  # "preference" | "prompt" | "sft"
    arrays: dict[str, np.ndarray]  # see the module docstring
    # "prompt_text": each prompt as text before tokenisation (the string, or the chat-template
    # rendering), plus the file's other columns (e.g. "answer"), None where a file lacks one;
    # prompt data keeps "prompt" as given (a string or a message list).
    columns: dict[str, list[Any]]
    sources: list[tuple[str, int]]  # (file, row number from 1) of each kept row
    stats: DataStats
    pad_token_id: int  # the value of padding positions in the id arrays

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def files(self) -> str:
        """The files the rows were read from, comma-separated (for messages)."""
        return ", ".join(dict.fromkeys(str(file) for file, _ in self.sources))


def check_data_config(config: DataConfig) -> None:
    """Raise ValueError naming the first DataConfig field that is out of range."""
    if config.format not in ("auto", "preference", "prompt", "sft"):
        raise ValueError(f"data.format must be auto, preference, prompt or sft, got {config.format!r}")
    for name in ("max_prompt_length", "max_response_length"):
        if getattr(config, name) < 1:
            raise ValueError(f"data.{name} must be >= 1, got {getattr(config, name)}")
    if config.bucket_multiple < 0:
        raise ValueError(f"data.bucket_multiple must be >= 0, got {config.bucket_multiple}")


# ----------------------------------------------------------------------------- tokenising


def load_data(
    paths: str | Path | Sequence[str | Path],
    tokenizer,
    config: DataConfig,
    *,
    kind: str | None = None,
    cache_dir: str | None = None,
) -> TokenizedData:
    """Read, validate and tokenise data files into one `TokenizedData`.

    Args:
      paths: one file or several (same kind); errors name the file and row.
      tokenizer: a loaded Hugging Face tokenizer, or the folder to load it from.
      config: lengths, `format` and `skip_invalid` (file lists in it are not read here).
      kind: force "preference" | "prompt" | "sft" (default: `config.format`, "auto" meaning
        detected from the first file's columns).
      cache_dir: the `datasets` cache folder (its default when None).
    """
    check_data_config(config)
    if isinstance(tokenizer, (str, Path)):
        from rlhf_jax.pipeline.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token; responses need one")
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise DataError("no data files given")
    kind = kind or (None if config.format == "auto" else config.format)
    if kind is not None and kind not in FORMATS:
        raise ValueError(f"kind must be one of {FORMATS}, got {kind!r}")
    parts, stats = [], DataStats()
    for path in paths:
        rows, unreadable = read_rows(path, cache_dir=cache_dir)
        if not rows and not unreadable:
            raise DataError(f"{path}: the file holds no rows")
        try:
            if kind is None:
                kind = detect_format([name for name in rows[0] if name != "__row__"] if rows else [])
            elif rows:  # the fields any row has
                present = {name for row in rows for name, value in row.items() if value is not None}
                check_kind(present - {"__row__"}, kind)
        except RowError as error:
            raise DataError(f"{path}: {error}") from None
        part = _tokenize_file(str(path), rows, unreadable, tokenizer, config, kind)
        stats.add(part.stats)
        parts.append(part)
    if stats.num_skipped:
        first = stats.skipped_reasons[0]
        logger.warning("skipped %d invalid rows of %d (first: %s)", stats.num_skipped, stats.num_rows, first)
    if stats.num_truncated:
        logger.warning(
            "%d rows of %d have a response longer than max_response_length=%d, truncated",
            stats.num_truncated,
            stats.num_used,
            config.max_response_length,
        )
    if stats.num_used == 0:
        raise DataError(f"{', '.join(map(str, paths))}: no valid rows ({stats.num_skipped} skipped)")
    data = TokenizedData(
        kind=kind,
        arrays={name: np.concatenate([part.arrays[name] for part in parts]) for name in parts[0].arrays},
        columns={
            name: sum((part.columns.get(name, [None] * len(part)) for part in parts), [])
            for name in dict.fromkeys(name for part in parts for name in part.columns)
        },
        sources=sum((part.sources for part in parts), []),
        stats=stats,
        pad_token_id=parts[0].pad_token_id,
    )
    if kind == "preference":
        _warn_identical_pairs(data)
    _warn_double_bos(data, tokenizer.bos_token_id)
    return data


def _warn_double_bos(data: TokenizedData, bos: int | None) -> None:
    """One warning line when prompts start with the BOS twice: a string prompt that already
    holds a chat template's BOS gets the tokenizer's own as well (TRL does the same)."""
    if bos is None:
        return
    ids, mask = data.arrays["prompt_ids"], data.arrays["prompt_mask"]
    first = ids.shape[1] - mask.sum(axis=1)  # left-padded: the first real column
    rows = np.arange(len(ids))
    doubled = (mask.sum(axis=1) >= 2) & (ids[rows, np.minimum(first, ids.shape[1] - 1)] == bos) & (
        ids[rows, np.minimum(first + 1, ids.shape[1] - 1)] == bos)
    if doubled.any():
        file, row = data.sources[int(np.argmax(doubled))]
        logger.warning("%d prompts of %d start with the BOS token twice (a prompt string that holds its own BOS, "
                       "e.g. already rendered by a chat template, also gets the tokenizer's); give such rows as "
                       "messages, or their text without the BOS; first: %s row %d", int(doubled.sum()), len(data),
                       file, row)


def _warn_identical_pairs(data: TokenizedData) -> None:
    """One warning line when pairs have the same chosen and rejected tokens (as written, or
    once truncated): their log-ratios cancel, so they give no gradient yet count in the means."""
    ids, mask = data.arrays["response_ids"], data.arrays["response_mask"]
    same = np.all((ids[:, 0] == ids[:, 1]) | (mask[:, 0] == 0), axis=1) & np.all(mask[:, 0] == mask[:, 1], axis=1)
    if same.any():
        file, row = data.sources[int(np.argmax(same))]
        logger.warning("%d pairs of %d have the same chosen and rejected response (as tokenised and truncated to "
                       "max_response_length=%d), so they train nothing; first: %s row %d",
                       int(same.sum()), len(data), ids.shape[-1], file, row)


def _tokenize_file(path, rows, unreadable, tokenizer, config: DataConfig, kind: str) -> TokenizedData:
    stats = DataStats(num_rows=len(rows) + len(unreadable))

    def reject(number: int, problem: str) -> None:
        message = f"{path} row {number}: {problem}"
        if not config.skip_invalid:
            raise DataError(message)
        stats.num_skipped += 1
        if len(stats.skipped_reasons) < 5:
            stats.skipped_reasons.append(message)

    for number, problem in unreadable:
        reject(number, problem)

    def render(messages, add_generation_prompt, options):
        if getattr(tokenizer, "chat_template", None) is None:
            raise RowError(f"conversational rows need a tokenizer with a chat template; the tokenizer of "
                           f"{tokenizer.name_or_path or 'this run'} has none (add `chat_template` to its "
                           f"tokenizer_config.json, or point `tokenizer` at a folder that has one)")
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **options
        )

    render_marked = _marked_renderer(tokenizer) if kind == "sft" else None
    names = response_names(kind)
    # prompt rows keep their `prompt` as given (a string or a message list) for reward functions
    used_fields = {"messages", TEMPLATE_KWARGS, *names} if kind == "prompt" else {
        "prompt", "messages", "text", TEMPLATE_KWARGS, *names}
    rendered_rows = []
    for row in rows:
        number = row.pop("__row__")
        try:
            options = template_options(row, config)
            rendered_rows.append((number, row, render_row(
                row, kind, lambda messages, generation: render(messages, generation, options),
                None if render_marked is None else lambda messages: render_marked(messages, options),
                assistant_only=config.assistant_only_loss)))
        except RowError as error:
            reject(number, str(error))
    encoded = _encode_texts(tokenizer, [rendered for _, _, rendered in rendered_rows])
    kept, sources, extras = [], [], []
    for number, row, rendered in rendered_rows:
        try:
            tokens = _tokenize_row(rendered, encoded, tokenizer.eos_token_id, names, config)
        except RowError as error:
            reject(number, str(error))
            continue
        kept.append(tokens)
        sources.append((path, number))
        extras.append({name: value for name, value in row.items() if name not in used_fields})
    stats.num_used = len(kept)
    stats.num_truncated = sum(tokens["truncated"] for tokens in kept)
    columns = {"prompt_text": [tokens["prompt_text"] for tokens in kept]}
    for name in dict.fromkeys(name for extra in extras for name in extra):
        columns[name] = [extra.get(name) for extra in extras]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return TokenizedData(kind, _pad_arrays(kept, names, pad, config), columns, sources, stats, pad)


_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def template_options(row: dict, config: DataConfig) -> dict:
    """The chat-template keyword arguments of `row`: `data.chat_template_kwargs`, then the
    row's own `chat_template_kwargs` mapping (TRL's column; its null entries, which parquet
    adds for keys other rows have, left out)."""
    own = row.get(TEMPLATE_KWARGS)
    if own is not None and not isinstance(own, dict):
        raise RowError(f"field '{TEMPLATE_KWARGS}' must be a mapping of chat-template arguments, "
                       f"got {type(own).__name__}")
    return {**config.chat_template_kwargs, **{key: value for key, value in (own or {}).items() if value is not None}}


def _marked_renderer(tokenizer):
    """A function rendering messages with the tokenizer's chat template and returning the
    character spans of its `{% generation %}` blocks (what transformers'
    `apply_chat_template(..., return_assistant_tokens_mask=True)` marks), or None when the
    template has no such blocks (or there is no template)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    try:
        template = tokenizer.get_chat_template()
    except ValueError:  # several named templates and no default: each row reports it when rendered
        return None
    if not _GENERATION_BLOCK.search(template):
        return None
    from transformers.utils.chat_template_utils import render_jinja_template

    def render_marked(messages, options):
        texts, spans = render_jinja_template(
            conversations=[messages], chat_template=template, return_assistant_tokens_mask=True,
            add_generation_prompt=False, **{**tokenizer.special_tokens_map, **options},
        )
        return texts[0], [tuple(span) for span in spans[0]]

    return render_marked


def _encode_texts(tokenizer, rendered_rows: list[RenderedRow]) -> dict[tuple[str, bool], list[int]]:
    """Token ids of every distinct (text, add_special_tokens) the rows need, in batched calls.

    Prompts of string rows get the tokenizer's special tokens; everything else gets none.
    """
    needed: dict[tuple[str, bool], None] = {}
    for rendered in rendered_rows:
        needed[(rendered.prompt, not rendered.conversational)] = None
        for segments in rendered.responses.values():
            needed.update({(text, False): None for text, _ in segments})
    encoded = {}
    for special in (True, False):
        texts = [text for text, flag in needed if flag == special]
        if texts:
            ids = tokenizer(texts, add_special_tokens=special)["input_ids"]
            encoded.update({(text, special): list(row_ids) for text, row_ids in zip(texts, ids)})
    return encoded


def _tokenize_row(rendered: RenderedRow, encoded, eos: int, names, config: DataConfig) -> dict:
    """Token ids of one rendered row; raises RowError for a prompt that does not fit."""
    prompt_ids = list(encoded[(rendered.prompt, not rendered.conversational)])
    if len(prompt_ids) > config.max_prompt_length:
        raise RowError(
            f"prompt has {len(prompt_ids)} tokens, more than max_prompt_length={config.max_prompt_length}"
        )
    responses = {}
    for name in names:
        ids, trained = [], []
        for text, is_trained in rendered.responses[name]:
            segment = encoded[(text, False)]
            ids += segment
            trained += [is_trained] * len(segment)
        has_eos = eos in ids if rendered.conversational else bool(ids) and ids[-1] == eos
        if not has_eos:
            ids, trained = ids + [eos], trained + [True]
        responses[name] = (ids, trained)
    if not prompt_ids and names:  # nothing predicts the first token: it becomes the prompt
        firsts = {responses[name][0][0] for name in names}
        if len(firsts) > 1:
            raise RowError("prompt is empty (0 tokens) and the responses start with different tokens")
        prompt_ids = [firsts.pop()]
        for name in names:
            ids, trained = responses[name]
            if len(ids) == 1:
                raise RowError(f"prompt is empty (0 tokens) and '{name}' has only one token")
            responses[name] = (ids[1:], trained[1:])
    if not prompt_ids:
        raise RowError("prompt is empty (0 tokens)")
    tokens = {"prompt_ids": prompt_ids, "prompt_text": rendered.prompt, "truncated": 0}
    for name, (ids, trained) in responses.items():
        if len(ids) > config.max_response_length:
            ids, trained = ids[: config.max_response_length], trained[: config.max_response_length]
            tokens["truncated"] = 1
        tokens[name] = (ids, trained)
    return tokens


def _pad_arrays(kept: list[dict], names, pad: int, config: DataConfig) -> dict[str, np.ndarray]:
    prompt_width, response_width = config.max_prompt_length, config.max_response_length
    count = len(kept)
    arrays = {
        "prompt_ids": np.full((count, prompt_width), pad, np.int32),
        "prompt_mask": np.zeros((count, prompt_width), np.int32),
    }
    if names:
        arrays["response_ids"] = np.full((count, len(names), response_width), pad, np.int32)
        arrays["response_mask"] = np.zeros((count, len(names), response_width), np.int32)
    if names == ("completion",):
        arrays["loss_mask"] = np.zeros((count, 1, response_width), np.float32)
    for index, tokens in enumerate(kept):
        prompt = tokens["prompt_ids"]
        arrays["prompt_ids"][index, prompt_width - len(prompt) :] = prompt
        arrays["prompt_mask"][index, prompt_width - len(prompt) :] = 1
        for slot, name in enumerate(names):
            ids, trained = tokens[name]
            arrays["response_ids"][index, slot, : len(ids)] = ids
            arrays["response_mask"][index, slot, : len(ids)] = 1
            if "loss_mask" in arrays:
                arrays["loss_mask"][index, slot, : len(ids)] = trained
    return arrays
