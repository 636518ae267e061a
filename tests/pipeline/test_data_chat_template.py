"""SFT conversations with a Qwen3-style chat template, which drops the reasoning of the
assistant turns before the last user message: with `{% generation %}` blocks exactly the
marked text of the full rendering is trained; without them a multi-turn `messages` row is a
clear error and the prompt + completion split works.

Oracle: the token ids are written out by hand (the test tokenizer gives ids 0..6 to
<pad> <eos> <bos> <unk> <|system|> <|user|> <|assistant|> and 7.. to the alphabet in order),
and the loss mask is checked against transformers' own
`apply_chat_template(..., return_assistant_tokens_mask=True)`.
"""
import dataclasses
import json

import numpy as np
import pytest

from rlhf_jax.pipeline.data import DataConfig, load_data
from rlhf_jax.pipeline.data_formats import DataError, RowError, render_row
from rlhf_jax.pipeline.tokenizer import build_tokenizer

ALPHABET = "0123456789+=[] abcdefghijklmnopqrstuvwxyz"
PAD, EOS, BOS, USER, ASSISTANT = 0, 1, 2, 5, 6
CONFIG = DataConfig(max_prompt_length=24, max_response_length=24)


def qwen3_style_template(generation_blocks):
    """Reasoning is written `[...]` in front of the answer; assistant turns up to the last user
    message lose it, as Qwen3's template drops `<think>...</think>` there."""
    open_block, close_block = ("{% generation %}", "{% endgeneration %}") if generation_blocks else ("", "")
    return (
        "{{ bos_token }}"
        "{%- set ns = namespace(last_query=0) -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' %}{% set ns.last_query = loop.index0 %}{% endif -%}"
        "{%- endfor -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'assistant' -%}"
        "{%- if loop.index0 > ns.last_query %}{% set content = message['content'] -%}"
        "{%- else %}{% set content = message['content'].split(']')[-1] %}{% endif -%}"
        "{{ '<|assistant|>' }}" + open_block + "{{ content + eos_token }}" + close_block +
        "{%- else %}{{ '<|' + message['role'] + '|>' + message['content'] }}{% endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt %}{{ '<|assistant|>' }}{% endif -%}"
    )


@pytest.fixture(scope="module", params=[True, False], ids=["generation-blocks", "plain"])
def tokenizer(request, tmp_path_factory):
    tokenizer = build_tokenizer(tmp_path_factory.mktemp("tokenizer"), ALPHABET)
    tokenizer.chat_template = qwen3_style_template(request.param)
    tokenizer.generation_blocks = request.param
    return tokenizer


def ids(text):
    return [7 + ALPHABET.index(character) for character in text]


def message(role, content):
    return {"role": role, "content": content}


CONVERSATION = [message("user", "1+1="), message("assistant", "[add]2"),
                message("user", "x2="), message("assistant", "[double]4")]


def load(tokenizer, tmp_path, rows, config=CONFIG):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return load_data(path, tokenizer, config, cache_dir=str(tmp_path / "cache"))


def row_tokens(data, row):
    """(prompt ids, response ids, loss mask) of row `row`, padding removed."""
    prompt = data.arrays["prompt_ids"][row][data.arrays["prompt_mask"][row] == 1].tolist()
    real = data.arrays["response_mask"][row, 0] == 1
    response = data.arrays["response_ids"][row, 0][real].tolist()
    return prompt, response, data.arrays["loss_mask"][row, 0][real].tolist()


def test_multi_turn_messages_train_the_marked_text_or_fail_clearly(tokenizer, tmp_path):
    if not tokenizer.generation_blocks:
        with pytest.raises(DataError, match="row 1: .*not prefixes") as error:
            load(tokenizer, tmp_path, [{"messages": CONVERSATION}])
        text = str(error.value)
        assert "up to the assistant message at index 1" in text
        assert "{% generation %}" in text and "return_assistant_tokens_mask" in text
        assert "'prompt'" in text and "'completion'" in text
        return
    data = load(tokenizer, tmp_path, [{"messages": CONVERSATION}])
    prompt, response, trained = row_tokens(data, 0)
    assert prompt == [BOS, USER] + ids("1+1=") + [ASSISTANT]
    # the first turn as the full conversation renders it: its reasoning dropped
    assert response == ids("2") + [EOS, USER] + ids("x2=") + [ASSISTANT] + ids("[double]4") + [EOS]
    assert trained == [1, 1] + [0] * 5 + [1] * 10
    oracle = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)
    assert oracle["input_ids"] == prompt + response
    np.testing.assert_array_equal(oracle["assistant_masks"], [0] * len(prompt) + trained)


def test_rows_ending_with_the_trained_turn_work_either_way(tokenizer, tmp_path):
    rows = [{"prompt": CONVERSATION[:3], "completion": CONVERSATION[3:]}, {"messages": CONVERSATION[:2]}]
    data = load(tokenizer, tmp_path, rows)
    prompt, response, trained = row_tokens(data, 0)
    assert prompt == ([BOS, USER] + ids("1+1=") + [ASSISTANT] + ids("2") + [EOS, USER] + ids("x2=")
                      + [ASSISTANT])
    assert response == ids("[double]4") + [EOS]
    assert trained == [1] * len(response)
    prompt, response, trained = row_tokens(data, 1)
    assert prompt == [BOS, USER] + ids("1+1=") + [ASSISTANT]
    assert response == ids("[add]2") + [EOS]  # the last turn keeps its reasoning
    assert trained == [1] * len(response)


def test_without_assistant_only_loss_the_whole_conversation_is_trained(tokenizer, tmp_path):
    """`data.assistant_only_loss: false` (TRL's default): a `messages` row trains every token of
    the template's rendering but the first, which nothing predicts (TRL's labels, shifted); a
    `prompt` + `completion` row its whole completion, user turns and blocks alike."""
    config = dataclasses.replace(CONFIG, assistant_only_loss=False)
    rows = [{"messages": CONVERSATION}, {"prompt": CONVERSATION[:1], "completion": CONVERSATION[1:]}]
    data = load(tokenizer, tmp_path, rows, config)
    prompt, response, trained = row_tokens(data, 0)
    oracle = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert prompt == [BOS] and prompt + response == oracle
    assert trained == [1] * len(response)
    prompt, response, trained = row_tokens(data, 1)
    assert prompt == [BOS, USER] + ids("1+1=") + [ASSISTANT]
    assert response == ids("2") + [EOS, USER] + ids("x2=") + [ASSISTANT] + ids("[double]4") + [EOS]
    assert trained == [1] * len(response)
    if tokenizer.generation_blocks:  # by default only the blocks' text is trained
        (tmp_path / "default").mkdir()
        _, _, trained = row_tokens(load(tokenizer, tmp_path / "default", rows[1:]), 0)
        assert trained == [1, 1] + [0] * 5 + [1] * 10


def test_marked_spans_are_merged_and_an_unmarked_completion_is_an_error():
    def render(messages, add_generation_prompt):
        raise AssertionError("the prefix renderings are not used when the template marks text")

    def render_marked(messages):
        return "PabcdeQ", [(1, 3), (2, 4), (5, 5), (5, 6)]

    rendered = render_row({"messages": CONVERSATION}, "sft", render, render_marked)
    assert rendered.prompt == "P"
    assert rendered.responses == {"completion": [("abc", True), ("d", False), ("e", True), ("Q", False)]}
    with pytest.raises(RowError, match="marks no text of the assistant messages in field 'completion'"):
        render_row({"prompt": CONVERSATION[:3], "completion": CONVERSATION[3:]}, "sft", render,
                   lambda messages: ("text", [(0, 1)]))  # the prompt's one block is all there is
