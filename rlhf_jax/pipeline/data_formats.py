"""Data file and row formats: reading files, validating and rendering rows into texts.

Files: `.jsonl` (one JSON object per line), `.json` (a list of objects) and `.parquet`, read
through Hugging Face `datasets`, and folders written by `Dataset.save_to_disk`. Rows are numbered from 1 in file order (blank JSONL lines are
not rows), and every error names the file and the row.

Three kinds of dataset, each as plain strings or as conversations (lists of
`{"role": ..., "content": ...}` messages):

    preference  prompt/chosen/rejected strings;
                or `prompt` messages + `chosen`/`rejected` assistant messages;
                or full `chosen`/`rejected` conversations sharing a prefix (no `prompt`)
    prompt      `prompt` string or messages (PPO / GRPO / evaluation)
    sft         prompt/completion strings; `prompt` + `completion` messages; `messages`; or
                `text` (language modeling: the whole string is trained)

A row becomes a `RenderedRow`: the prompt text and, per response, a list of text segments
each marked as trained (counted by the loss) or not. String rows are used as they are (the
tokenizer's own special tokens, e.g. BOS, go in front of the prompt; EOS is appended to the
response by `rlhf_jax.pipeline.data`). Conversational rows go through the tokenizer's chat
template: the prompt is the rendering of the prompt messages with `add_generation_prompt=True`
and the response is what the full conversation's rendering adds after it (this needs a
template whose renderings of a conversation's prefixes are prefixes of its rendering).
In `messages` rows every assistant message is trained; the prompt is everything before the
first one (with `data.assistant_only_loss: false`, TRL's default, the whole conversation is
trained). A `text` row (TRL's language-modeling rows) has an empty prompt and the whole string
as its trained response: every token is trained but the first one that nothing predicts (the
tokenizer's BOS when it adds one, else the text's first token; `rlhf_jax.pipeline.data`).

Conversational SFT rows and templates that change earlier turns: some templates render an
assistant message differently once later messages follow (Qwen3's drops the `<think>...</think>`
reasoning of assistant turns before the last user message), so the rendering of a leading part
of a conversation is not a prefix of the whole rendering. For SFT rows there are two ways out:

- a chat template that wraps the text to train in `{% generation %}...{% endgeneration %}`
  blocks (the blocks of transformers' `apply_chat_template(..., return_assistant_tokens_mask=True)`,
  TRL's `assistant_only_loss`). When the tokenizer's template has such blocks, an SFT row is
  rendered as the full conversation, and exactly the text inside the blocks is trained
  (as it appears in that rendering); the prompt is the text before the first trained block.
  In `prompt` + `completion` rows only the completion's blocks are trained (the blocks of the
  prompt messages rendered alone are skipped: blocks are emitted in message order).
- otherwise, rows that each end with the assistant turn to train, as `prompt` (the earlier
  messages) + `completion` (that turn) rows: only the last turn is then trained, and templates
  like Qwen3's keep the last turn's reasoning. A row that breaks the prefix property is a
  RowError naming the message that broke it and these two remedies.

Problems are reported by raising `RowError` with a message naming the field; the caller adds
the file and row.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

FORMATS = ("preference", "prompt", "sft")
_READERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """A data file or row that cannot be used; the message names the file (and row)."""


class RowError(ValueError):
    """A problem with one row; the message names the field."""


@dataclass(frozen=True)
class RenderedRow:
    """One row as text: `responses` maps a response name to its (text, trained) segments."""

    prompt: str
    responses: dict[str, list[tuple[str, bool]]] = field(default_factory=dict)
    conversational: bool = False


def detect_format(columns: Sequence[str]) -> str:
    """The dataset kind implied by its column names (see the module docstring)."""
    names = set(columns)
    if names & {"chosen", "rejected"}:
        return "preference"
    if names & {"messages", "completion"}:
        return "sft"
    if "prompt" in names:
        return "prompt"
    if "text" in names:
        return "sft"
    raise RowError(
        f"cannot tell the format from the columns {sorted(names)}: expected prompt/chosen/rejected "
        "(preference), prompt/completion, messages or text (sft), or prompt (prompt-only)"
    )


_DESCRIPTIONS = {"preference": "preference data (prompt/chosen/rejected)",
                 "sft": "SFT data (prompt/completion, messages or text)", "prompt": "prompt data (prompt)"}


def check_kind(columns: Sequence[str], kind: str) -> None:
    """Raise RowError when the columns lack what a `kind` row needs and are recognisably
    another kind's (e.g. preference pairs given to SFT), naming both kinds."""
    names = set(columns)
    needed = {"preference": [{"chosen", "rejected"}], "sft": [{"completion"}, {"messages"}, {"text"}],
              "prompt": [{"prompt"}]}[kind]
    if any(group <= names for group in needed):
        return
    try:
        detected = detect_format(columns)
    except RowError:
        return
    if detected != kind:
        raise RowError(f"the columns {sorted(names)} are {_DESCRIPTIONS[detected]}, but this stage takes "
                       f"{_DESCRIPTIONS[kind]}")


def response_names(kind: str) -> tuple[str, ...]:
    """The responses a row of `kind` carries."""
    return {"preference": ("chosen", "rejected"), "sft": ("completion",), "prompt": ()}[kind]


# ----------------------------------------------------------------------------- reading files


def read_rows(path: str | Path, *, cache_dir: str | None = None) -> tuple[list[dict], list[tuple[int, str]]]:
    """Read a data file through `datasets`.

    Returns `(rows, unreadable)`: the rows as dicts, each with its number in the file under
    `"__row__"`, and `(row number, reason)` for records that are not JSON objects. Where
    `datasets` cannot read a JSON file faithfully (a line that is not JSON, a column mixing
    types, bytes that are not UTF-8) the file is parsed with the `json` module instead, with
    the same row numbers. Text that is not valid UTF-8 (a binary file, another encoding) is a
    DataError naming the file and the row (JSONL, parquet) or the byte offset (JSON).
    """
    import datasets

    path = Path(path)
    if path.is_dir():
        return _read_saved_dataset(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected .json, .jsonl or .parquet")
    datasets.disable_progress_bars()
    verbosity = datasets.logging.get_verbosity()
    # datasets logs the JSON errors that the by-hand parse below then reports per row
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        dataset = datasets.load_dataset(reader, data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as error:  # datasets wraps arrow/json errors in several classes
        if reader == "json":
            return _read_json_by_hand(path)
        raise DataError(f"{path}: cannot be read as {reader}: {error}") from error
    finally:
        datasets.logging.set_verbosity(verbosity)
    if any(type(feature).__name__ == "Json" for feature in dataset.features.values()):
        # A column whose rows hold different types: datasets re-decodes such values (a
        # string "12" becomes the number 12), so read the exact values by hand instead.
        return _read_json_by_hand(path)
    try:
        rows = dataset.to_list()
    except UnicodeDecodeError:  # parquet string columns are decoded only here
        row, column = _first_undecodable(dataset)
        raise DataError(f"{path} row {row}: column '{column}' is not valid UTF-8 text") from None
    for number, row in enumerate(rows, start=1):
        row["__row__"] = number
    return rows, []


def _read_saved_dataset(path: Path) -> tuple[list[dict], list[tuple[int, str]]]:
    """The rows of a folder written by `datasets` `save_to_disk` (a `DatasetDict`: its
    `train` split, or its only one)."""
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as error:  # not a saved dataset, or an unreadable one
        raise DataError(f"{path}: a folder, but not one written by datasets' save_to_disk ({error})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset and len(dataset) != 1:
            raise DataError(f"{path}: a DatasetDict with splits {sorted(dataset)} and no 'train' split")
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    rows = dataset.to_list()
    for number, row in enumerate(rows, start=1):
        row["__row__"] = number
    return rows, []


def _first_undecodable(dataset, chunk: int = 1024) -> tuple[int, str]:
    """(row number from 1, column) of the first value that is not valid UTF-8."""
    for name in dataset.column_names:
        column = dataset.data.column(name)
        for begin in range(0, len(column), chunk):
            part = column.slice(begin, chunk)
            try:
                part.to_pylist()
                continue
            except UnicodeDecodeError:
                pass
            for offset in range(len(part)):
                try:
                    part.slice(offset, 1).to_pylist()
                except UnicodeDecodeError:
                    return begin + offset + 1, name
    return 1, dataset.column_names[0]  # not reached: some value failed to decode


def _decode_utf8(path: Path, data: bytes, *, lines_are_rows: bool) -> str:
    """`data` as text (a UTF-8 byte-order mark is dropped); bytes that are not UTF-8 are a
    DataError naming the row (JSONL: non-blank lines up to the bad byte) or the byte offset."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        offset = error.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        detail = f"byte 0x{data[offset]:02x} at offset {offset} is not valid UTF-8 (is this a text file?)"
        if not lines_are_rows:
            line = data.count(b"\n", 0, offset) + 1
            raise DataError(f"{path}: line {line}: {detail}") from None
        before = data[:offset].split(b"\n")
        row = sum(1 for line in before[:-1] if line.strip()) + 1
        raise DataError(f"{path} row {row}: {detail}") from None


def _read_json_by_hand(path: Path) -> tuple[list[dict], list[tuple[int, str]]]:
    """The rows of a JSON array file or a JSON-lines file, parsed with the `json` module."""
    data = path.read_bytes()
    is_array = data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")
    text = _decode_utf8(path, data, lines_are_rows=not is_array)
    if is_array:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not valid JSON: {error}") from error
        lines = [(number, record, None) for number, record in enumerate(records, start=1)]
    else:
        lines = []
        for line in (line for line in text.splitlines() if line.strip()):
            try:
                lines.append((len(lines) + 1, json.loads(line), None))
            except json.JSONDecodeError as error:
                lines.append((len(lines) + 1, None, f"not valid JSON ({error})"))
    rows, unreadable = [], []
    for number, record, problem in lines:
        if problem is None and not isinstance(record, dict):
            problem = f"must be a JSON object, got {type(record).__name__}"
        if problem is not None:
            unreadable.append((number, problem))
        else:
            rows.append({**record, "__row__": number})
    return rows, unreadable


# ----------------------------------------------------------------------------- field checks


def _field(row: dict, name: str) -> Any:
    """`row[name]`; a RowError naming the fields the row does have when it is missing."""
    value = row.get(name)
    if value is None:
        present = [key for key, item in row.items() if item is not None and key != "__row__"]
        raise RowError(f"field '{name}' is missing (the row has: {', '.join(present) or 'no fields'})")
    return value


def _text_or_messages(row: dict, name: str) -> str | list[dict]:
    """The field as a string or as a validated list of messages."""
    value = _field(row, name)
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return _messages(value, name)
    raise RowError(
        f"field '{name}' must be a string or a list of {{role, content}} messages, got {type(value).__name__}"
    )


def _messages(value: Sequence, name: str) -> list[dict]:
    if len(value) == 0:
        raise RowError(f"field '{name}' is an empty list of messages")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise RowError(f"field '{name}' message {index} must be a mapping, got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                got = ("missing" if key not in message else "null" if message[key] is None
                       else f"a {type(message[key]).__name__}")
                raise RowError(f"field '{name}' message {index}: '{key}' must be a string, got {got}")
        # Parquet/arrow give every message all keys seen in the column; drop the empty ones.
        messages.append({key: item for key, item in message.items() if item is not None})
    return messages


def _check_response(value: str | list[dict], name: str) -> None:
    if isinstance(value, str):
        if value == "":
            raise RowError(f"field '{name}' is empty")
        return
    assistant = [message for message in value if message["role"] == "assistant"]
    if not assistant:
        raise RowError(f"field '{name}' has no assistant message")
    if any(message["content"] == "" for message in assistant):
        raise RowError(f"field '{name}' has an empty assistant message")
    if value[-1]["role"] != "assistant":  # the EOS appended after it would be trained there
        raise RowError(f"field '{name}' ends with a {value[-1]['role']} message; end it with the assistant "
                       f"message to train (a response ends with the EOS, and the model would learn to stop "
                       f"after the {value[-1]['role']}'s turn)")


def _same_kind(row_fields: dict[str, str | list]) -> bool:
    kinds = {isinstance(value, str) for value in row_fields.values()}
    if len(kinds) > 1:
        names = " and ".join(f"'{name}'" for name in row_fields)
        raise RowError(f"fields {names} mix plain strings and message lists")
    return kinds == {False}


# ----------------------------------------------------------------------------- rendering

Render = Callable[[list[dict], bool], str]  # (messages, add_generation_prompt) -> text
# messages -> (their rendering, the (start, end) character spans of its {% generation %} blocks)
RenderMarked = Callable[[list[dict]], tuple[str, list[tuple[int, int]]]]

_REMEDY = (
    "; to train on such conversations, use a chat template that wraps the assistant text in "
    "{% generation %}...{% endgeneration %} blocks (transformers' return_assistant_tokens_mask "
    "feature: then exactly that text is trained), or split the conversation into rows that each "
    "end with the assistant message to train, as 'prompt' (the messages before it) + 'completion' "
    "(that message): only that last message is then trained"
)


def render_row(
    row: dict, kind: str, render: Render, render_marked: RenderMarked | None = None,
    assistant_only: bool = True,
) -> RenderedRow:
    """Validate `row` as a `kind` row and render it to text (raises RowError).

    `render_marked` is given when the chat template has `{% generation %}` blocks: conversational
    SFT rows then train exactly the text inside them (see the module docstring). With
    `assistant_only` False (TRL's `assistant_only_loss=False`), a `messages` row trains its whole
    rendering and a `prompt` + `completion` row its whole completion, blocks or not.
    """
    if kind == "prompt":
        prompt = _text_or_messages(row, "prompt")
        if isinstance(prompt, str):
            return RenderedRow(prompt)
        return RenderedRow(_render_checked(render, prompt, True), conversational=True)
    if kind == "sft":
        if all(row.get(name) is None for name in ("prompt", "completion", "messages")) and \
                row.get("text") is not None:
            return _render_text(row)
        if not assistant_only:
            render_marked = None
        if row.get("messages") is not None and row.get("completion") is None:
            messages = _text_or_messages(row, "messages")
            if not assistant_only:
                return _render_whole_conversation(messages, render)
            if render_marked is not None and not isinstance(messages, str):
                _check_response(messages, "messages")
                return _render_marked(messages, 0, render_marked, "messages")
            return _render_messages(messages, render)
        if render_marked is not None:
            prompt, completion = _text_or_messages(row, "prompt"), _text_or_messages(row, "completion")
            _check_response(completion, "completion")
            if _same_kind({"prompt": prompt, "completion": completion}):
                skipped = len(_render_marked_checked(render_marked, prompt)[1])
                return _render_marked(prompt + completion, skipped, render_marked, "completion")
        return _render_prompt_responses(row, ("completion",), render)
    if kind == "preference":
        if row.get("prompt") is None and isinstance(row.get("chosen"), (list, tuple)):
            return _render_implicit_prompt(row, render)
        return _render_prompt_responses(row, ("chosen", "rejected"), render)
    raise ValueError(f"kind must be one of {FORMATS}, got {kind!r}")


def _render_text(row: dict) -> RenderedRow:
    """A language-modeling row: an empty prompt, the `text` string trained whole."""
    text = row["text"]
    if not isinstance(text, str):
        raise RowError(f"field 'text' must be a string, got {type(text).__name__}")
    _check_response(text, "text")
    return RenderedRow("", {"completion": [(text, True)]})


def _render_prompt_responses(row: dict, names: tuple[str, ...], render: Render) -> RenderedRow:
    prompt = _text_or_messages(row, "prompt")
    responses = {name: _text_or_messages(row, name) for name in names}
    for name, value in responses.items():
        _check_response(value, name)
    if not _same_kind({"prompt": prompt, **responses}):
        return RenderedRow(prompt, {name: [(value, True)] for name, value in responses.items()})
    prompt_text = _render_checked(render, prompt, True)
    rendered = {}
    for name, value in responses.items():
        full = _render_checked(render, prompt + value, False)
        if not full.startswith(prompt_text):
            raise RowError(
                f"the chat template's rendering of 'prompt' (with the generation prompt) is not a "
                f"prefix of its rendering of 'prompt' + '{name}', so the response cannot be separated"
                + (_REMEDY if name == "completion" else "")
            )
        rendered[name] = [(full[len(prompt_text):], True)]
    return RenderedRow(prompt_text, rendered, conversational=True)


def _render_implicit_prompt(row: dict, render: Render) -> RenderedRow:
    """Full chosen/rejected conversations: the shared leading messages are the prompt."""
    chosen, rejected = (_text_or_messages(row, name) for name in ("chosen", "rejected"))
    _same_kind({"chosen": chosen, "rejected": rejected})
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise RowError("field 'prompt' is missing and 'chosen'/'rejected' share no leading messages")
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if shared == len(messages):
            raise RowError(f"field '{name}' has no messages after the prompt shared with the other response")
        if messages[shared]["role"] != "assistant":
            raise RowError(f"'chosen' and 'rejected' first differ at message {shared}, a {messages[shared]['role']} "
                           f"message in '{name}': their shared leading messages are the prompt, so the two must "
                           f"first differ in the assistant's answer (one prompt per pair)")
    return _render_prompt_responses(
        {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]},
        ("chosen", "rejected"),
        render,
    )


def _check_conversation(messages: str | list[dict]) -> None:
    """A RowError unless a `messages` field is a message list that ends with an assistant turn."""
    if isinstance(messages, str):
        raise RowError("field 'messages' must be a list of {role, content} messages, got str")
    _check_response(messages, "messages")


def _render_whole_conversation(messages: str | list[dict], render: Render) -> RenderedRow:
    """An SFT conversation trained whole: an empty prompt, its full rendering the response."""
    _check_conversation(messages)
    return RenderedRow("", {"completion": [(_render_checked(render, messages, False), True)]},
                       conversational=True)


def _render_messages(messages: str | list[dict], render: Render) -> RenderedRow:
    """An SFT conversation: every assistant message is trained, the rest is context."""
    _check_conversation(messages)
    full = _render_checked(render, messages, False)
    segments: list[tuple[str, bool]] = []
    prompt_end, position = None, 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render_checked(render, messages[:index], True) if index else ""
        through = _render_checked(render, messages[: index + 1], False)
        if not full.startswith(through):
            raise RowError(
                f"the chat template's renderings of the leading messages are not prefixes of the "
                f"conversation's rendering, so the assistant messages cannot be separated: messages "
                f"0..{index} (up to the assistant message at index {index}) render differently once "
                f"the later messages follow (e.g. a template that drops the reasoning of earlier turns)"
                + _REMEDY
            )
        if not (through.startswith(before) and len(before) >= position):
            raise RowError(
                f"the chat template's renderings of the leading messages are not prefixes of the "
                f"conversation's rendering, so the assistant messages cannot be separated: messages "
                f"0..{index - 1} rendered with the generation prompt are not a prefix of messages "
                f"0..{index} (up to the assistant message at index {index})" + _REMEDY
            )
        if prompt_end is None:
            prompt_end = len(before)
        elif len(before) > position:
            segments.append((full[position : len(before)], False))
        segments.append((full[len(before) : len(through)], True))
        position = len(through)
    if position < len(full):
        segments.append((full[position:], False))
    return RenderedRow(full[:prompt_end], {"completion": segments}, conversational=True)


def _render_checked(render: Render, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return render(messages, add_generation_prompt)
    except RowError:
        raise
    except Exception as error:  # jinja errors, raise_exception() in templates
        raise RowError(f"the chat template failed: {error}") from error


def _render_marked(messages: list[dict], skipped: int, render_marked: RenderMarked, name: str) -> RenderedRow:
    """An SFT conversation whose template marks the trained text with generation blocks: the
    text in the blocks after the first `skipped` ones is trained, the prompt is everything
    before the first trained block, the rest is untrained context."""
    full, spans = _render_marked_checked(render_marked, messages)
    trained = _merge_spans(spans[skipped:])
    if not trained:
        raise RowError(
            f"the chat template has {{% generation %}} blocks but marks no text of the assistant "
            f"messages in field '{name}', so nothing would be trained"
        )
    segments: list[tuple[str, bool]] = []
    position = trained[0][0]
    for start, end in trained:
        if start > position:
            segments.append((full[position:start], False))
        segments.append((full[start:end], True))
        position = end
    if position < len(full):
        segments.append((full[position:], False))
    return RenderedRow(full[: trained[0][0]], {"completion": segments}, conversational=True)


def _merge_spans(spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The non-empty character spans, sorted, with overlapping or touching ones joined
    (nested generation blocks give overlapping spans)."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(span for span in spans if span[1] > span[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _render_marked_checked(
    render_marked: RenderMarked, messages: list[dict]
) -> tuple[str, list[tuple[int, int]]]:
    try:
        return render_marked(messages)
    except RowError:
        raise
    except Exception as error:  # jinja errors, raise_exception() in templates
        raise RowError(f"the chat template failed: {error}") from error
