"""Chat-template arguments (Qwen3's `enable_thinking`): `data.chat_template_kwargs` for every
row, a row's own `chat_template_kwargs` mapping (TRL's column) on top; the column is not a
data column the reward functions get. Oracle: transformers' `apply_chat_template` with the
same arguments."""
import dataclasses
import json

import pytest

from rlhf_jax.pipeline.data import DataConfig, load_data
from rlhf_jax.pipeline.data_formats import DataError
from rlhf_jax.pipeline.tokenizer import build_tokenizer

# an empty reasoning block "[]" opens the assistant's turn when thinking is off (as Qwen3's)
THINKING_OFF = "{%- if enable_thinking is defined and not enable_thinking %}{{ '[]' }}{% endif %}"
TEMPLATE = ("{{ bos_token }}{%- for message in messages -%}"
            "{%- if message['role'] == 'assistant' -%}{{ '<|assistant|>' }}" + THINKING_OFF + "{% generation %}"
            "{{ message['content'] + eos_token }}{% endgeneration %}"
            "{%- else %}{{ '<|' + message['role'] + '|>' + message['content'] }}{% endif -%}{%- endfor -%}"
            "{%- if add_generation_prompt %}{{ '<|assistant|>' }}" + THINKING_OFF + "{% endif -%}")
CONFIG = DataConfig(max_prompt_length=24, max_response_length=8)
USER = [{"role": "user", "content": "1+1="}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tokenizer = build_tokenizer(tmp_path_factory.mktemp("tokenizer"), "0123456789+=[]")
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def load(tokenizer, tmp_path, rows, kind, **config):
    path = tmp_path / f"{kind}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return load_data(path, tokenizer, dataclasses.replace(CONFIG, **config), kind=kind,
                     cache_dir=str(tmp_path / "cache"))


def expected(tokenizer, **options):
    return tokenizer.apply_chat_template(USER, tokenize=False, add_generation_prompt=True, **options)


def test_config_and_row_arguments_reach_the_template(tokenizer, tmp_path):
    rows = [{"prompt": USER, "answer": "2"},
            {"prompt": USER, "answer": "2", "chat_template_kwargs": {"enable_thinking": True}}]
    plain = load(tokenizer, tmp_path, rows, "prompt")
    assert plain.columns["prompt_text"] == [expected(tokenizer), expected(tokenizer, enable_thinking=True)]
    assert "chat_template_kwargs" not in plain.columns and plain.columns["answer"] == ["2", "2"]
    off = load(tokenizer, tmp_path, rows, "prompt", chat_template_kwargs={"enable_thinking": False})
    assert off.columns["prompt_text"] == [expected(tokenizer, enable_thinking=False),  # the config's
                                          expected(tokenizer, enable_thinking=True)]   # the row's wins
    assert off.columns["prompt_text"][0].endswith("<|assistant|>[]")


def test_sft_rows_with_generation_blocks_render_with_them(tokenizer, tmp_path):
    rows = [{"prompt": USER, "completion": [{"role": "assistant", "content": "2"}]}]
    data = load(tokenizer, tmp_path, rows, "sft", chat_template_kwargs={"enable_thinking": False})
    assert data.columns["prompt_text"][0] == expected(tokenizer, enable_thinking=False)


def test_a_row_whose_arguments_are_not_a_mapping_is_named(tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"row 1: field 'chat_template_kwargs' must be a mapping"):
        load(tokenizer, tmp_path, [{"prompt": USER, "chat_template_kwargs": "no thinking"}], "prompt")
