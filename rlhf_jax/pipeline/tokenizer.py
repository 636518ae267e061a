"""A character-level Hugging Face tokenizer for the built-in task (and any small alphabet).

Every character of the alphabet is one token (a `tokenizers` WordLevel model behind a
pre-tokenizer that isolates each character), so a tiny model sees the digits one by one. The
folder written by `build_tokenizer` is an ordinary Hugging Face tokenizer folder:
`transformers.AutoTokenizer.from_pretrained(folder)` loads it, and the data code treats it
exactly like the tokenizer of a user's model.

Token ids (fixed, so tests and configs can rely on them):

    0 <pad>   1 <eos>   2 <bos>   3 <unk>   4 <|system|>   5 <|user|>   6 <|assistant|>
    7...      the alphabet's characters, in the order given

Pad and EOS are distinct tokens here (a user's tokenizer may have no pad token: `pad_id` then
gives its EOS id, as TRL does; masks, not ids, say what is padding).
With `add_bos=True` the tokenizer puts `<bos>` in front of every text it encodes with
`add_special_tokens=True`, and the chat template starts with it.

Chat template (jinja, stored in `tokenizer_config.json` under `chat_template`): each message
is rendered as `<|role|>content`, an assistant message is closed by `<eos>`, and
`add_generation_prompt=True` appends `<|assistant|>`. For example
`[user "12+3=", assistant "15"]` renders as `<bos><|user|>12+3=<|assistant|>15<eos>`.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rlhf_jax.models.errors import ModelError

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
BOS_TOKEN = "<bos>"
UNK_TOKEN = "<unk>"
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = tuple(f"<|{role}|>" for role in ROLES)
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, BOS_TOKEN, UNK_TOKEN) + ROLE_TOKENS

_CHAT_TEMPLATE_BODY = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('unsupported role: ' + message['role']) }}"
    "{%- endif -%}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{%- if message['role'] == 'assistant' %}{{ eos_token }}{% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>' }}{% endif -%}"
)


def chat_template(*, add_bos: bool = True) -> str:
    """The jinja chat template described in the module docstring."""
    return ("{{ bos_token }}" if add_bos else "") + _CHAT_TEMPLATE_BODY


def build_tokenizer(
    folder: str | Path,
    alphabet: str,
    *,
    add_bos: bool = True,
    padding_side: str = "left",
) -> PreTrainedTokenizerFast:
    """Build a character-level tokenizer over `alphabet` and save it to `folder`.

    Args:
      folder: directory to write (created if needed); it then holds `tokenizer.json` and
        `tokenizer_config.json` (with the chat template).
      alphabet: the characters that get their own token (duplicates are ignored; a character
        outside it encodes as `<unk>`). Must not be empty.
      add_bos: put `<bos>` in front of encoded texts and of rendered chats.
      padding_side: the side `tokenizer(..., padding=True)` pads on; "left" suits generation.
        The data code in `rlhf_jax.pipeline.data` pads by itself and ignores this.

    Returns:
      The tokenizer, as `transformers.AutoTokenizer.from_pretrained(folder)` would load it.
    """
    if not isinstance(alphabet, str) or not alphabet:
        raise ValueError(f"alphabet must be a non-empty string, got {alphabet!r}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    characters = list(dict.fromkeys(alphabet))
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + tuple(characters))}

    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join characters without separators
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A",
            pair=f"{BOS_TOKEN} $A $B",
            special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])],
        )

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=chat_template(add_bos=add_bos),
        padding_side=padding_side,
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    _store_template_in_config(folder, tokenizer.chat_template)
    return load_tokenizer(folder)


def _store_template_in_config(folder: Path, template: str) -> None:
    """Keep the chat template inside tokenizer_config.json (read by every transformers
    version) instead of a separate chat_template.jinja, and name the generic fast class."""
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = template
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    (folder / "chat_template.jinja").unlink(missing_ok=True)


def load_tokenizer(folder: str | Path):
    """Load a Hugging Face tokenizer folder (ours or a user's model folder).

    Raises `rlhf_jax.models.errors.ModelError` naming the folder when it does not exist, holds
    no tokenizer `transformers` can read (missing or corrupt files), or the tokenizer has no
    EOS token (responses must end with one).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(folder, "tokenizer folder not found")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:  # transformers/tokenizers raise OSError, ValueError, and their own types
        detail = " ".join(str(err).split())
        if len(detail) > 300:
            detail = detail[:300] + " ..."
        raise ModelError(folder, f"no readable tokenizer ({type(err).__name__}: {detail})") from None
    if tokenizer.eos_token_id is None:
        raise ModelError(folder, "the tokenizer has no eos_token; responses need one")
    return tokenizer


def pad_id(tokenizer) -> int:
    """The id that pads `tokenizer`'s sequences: its pad token's, or its EOS token's when it
    has none (TRL's convention; Llama and Mistral tokenizers ship without a pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
