"""The character-level tokenizer: a Hugging Face folder with distinct pad/EOS and a chat template."""
import json
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from rlhf_jax.models.errors import ModelError
from rlhf_jax.pipeline.tokenizer import build_tokenizer, load_tokenizer

ALPHABET = "0123456789+-= ab"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path, ALPHABET)
    return path


@pytest.fixture(scope="module")
def tokenizer(folder):
    return AutoTokenizer.from_pretrained(str(folder))


def expected_ids(text):
    """Independent oracle: special tokens take ids 0..6, the alphabet follows in order."""
    return [7 + ALPHABET.index(character) for character in text]


def test_special_token_ids_are_fixed_and_pad_differs_from_eos(tokenizer):
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token, tokenizer.unk_token) == (
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
    )
    special_ids = [tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id]
    assert special_ids + [tokenizer.unk_token_id] == [0, 1, 2, 3]
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) == 7 + len(ALPHABET)


def test_encodes_one_token_per_character_with_bos(tokenizer):
    assert tokenizer("12+345=")["input_ids"] == [2] + expected_ids("12+345=")
    assert tokenizer("12 ab", add_special_tokens=False)["input_ids"] == expected_ids("12 ab")


def test_unknown_character_becomes_unk(tokenizer):
    encoded = tokenizer("1x2", add_special_tokens=False)["input_ids"]
    assert encoded == expected_ids("1") + [3] + expected_ids("2")


@settings(max_examples=25, deadline=None)
@given(text=st.text(alphabet=ALPHABET, max_size=30))
def test_round_trip(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(ids) == "<bos>" + text


def test_decode_keeps_eos_and_pad_as_text(tokenizer):
    ids = expected_ids("357") + [1, 0, 0]
    assert tokenizer.decode(ids) == "357<eos><pad><pad>"


def test_chat_template_renders_and_tokenizes(folder, tokenizer):
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "chat_template" in config
    messages = [
        {"role": "system", "content": "ab"},
        {"role": "user", "content": "12+3="},
        {"role": "assistant", "content": "15"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<bos><|system|>ab<|user|>12+3=<|assistant|>15<eos>"
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<bos><|system|>ab<|user|>12+3=<|assistant|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == [2, 4] + expected_ids("ab") + [5] + expected_ids("12+3=") + [6] + expected_ids("15") + [1]


def test_chat_template_rejects_unknown_role(tokenizer):
    with pytest.raises(Exception, match="unsupported role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "1"}], tokenize=False)


def test_without_bos(tmp_path):
    tokenizer = build_tokenizer(tmp_path, "01", add_bos=False, padding_side="right")
    assert tokenizer("10")["input_ids"] == [8, 7]
    assert tokenizer.apply_chat_template([{"role": "user", "content": "1"}], tokenize=False) == "<|user|>1"
    assert tokenizer.padding_side == "right"
    assert load_tokenizer(tmp_path)("01")["input_ids"] == [7, 8]


def test_duplicate_alphabet_characters_are_ignored(tmp_path):
    tokenizer = build_tokenizer(tmp_path, "0110")
    assert len(tokenizer) == 9


@pytest.mark.parametrize("alphabet", ["", None])
def test_bad_alphabet_raises(tmp_path, alphabet):
    with pytest.raises(ValueError, match="alphabet"):
        build_tokenizer(tmp_path, alphabet)


def test_bad_padding_side_raises(tmp_path):
    with pytest.raises(ValueError, match="padding_side"):
        build_tokenizer(tmp_path, "01", padding_side="middle")


def test_load_missing_folder_raises(tmp_path):
    with pytest.raises(ModelError, match="tokenizer folder not found") as error:
        load_tokenizer(tmp_path / "nothing")
    assert error.value.folder == str(tmp_path / "nothing")


@pytest.mark.parametrize("breakage", ["empty folder", "tokenizer.json not JSON", "tokenizer.json binary"])
def test_unreadable_tokenizer_folder_is_a_model_error_naming_it(folder, tmp_path, breakage):
    broken = tmp_path / "tokenizer"
    if breakage == "empty folder":
        broken.mkdir()
    else:
        shutil.copytree(folder, broken)
        content = b'{"version": "1.0", "trunc' if breakage == "tokenizer.json not JSON" else bytes(range(256))
        (broken / "tokenizer.json").write_bytes(content)
    with pytest.raises(ModelError, match="no readable tokenizer") as error:
        load_tokenizer(broken)
    assert error.value.folder == str(broken) and "\n" not in str(error.value)
