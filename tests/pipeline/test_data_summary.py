"""The block a supervised stage prints when it starts: row counts and the first row decoded
from its token ids (prompt, response(s), trained tokens), so a wrong chat template, a missing
EOS or a cut response shows before training."""
import json

import pytest

from rlhf_jax.pipeline.data import DataConfig, load_data
from rlhf_jax.pipeline.stages.skeletons import print_data_start
from rlhf_jax.pipeline.tokenizer import build_tokenizer

ALPHABET = "0123456789+= abcdefghijklmnopqrstuvwxyz"
TEMPLATE = ("{{ bos_token }}{%- for message in messages -%}"
            "{%- if message['role'] == 'assistant' -%}{{ '<|assistant|>' }}{% generation %}"
            "{{ message['content'] + eos_token }}{% endgeneration %}"
            "{%- else %}{{ '<|' + message['role'] + '|>' + message['content'] }}{% endif -%}{%- endfor -%}"
            "{%- if add_generation_prompt %}{{ '<|assistant|>' }}{% endif -%}")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tokenizer = build_tokenizer(tmp_path_factory.mktemp("tokenizer"), ALPHABET)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def load(tokenizer, folder, rows, kind, max_response_length=8):
    path = folder / f"{kind}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return load_data(path, tokenizer, DataConfig(max_prompt_length=16, max_response_length=max_response_length),
                     kind=kind, cache_dir=str(folder / "cache"))


def decoded(tokenizer, text):
    return repr(tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]))


def test_sft_shows_counts_prompt_response_and_trained_tokens(tokenizer, tmp_path, capsys):
    rows = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2+2=", "completion": "4444444444"}]
    data = load(tokenizer, tmp_path, rows, "sft")
    (tmp_path / "held_out").mkdir()
    held_out = load(tokenizer, tmp_path / "held_out", [rows[0]], "sft")
    print_data_start("sft", data, held_out, tokenizer)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[sft] data: 2 rows of 2 (0 skipped, 1 truncated); held-out: 1 rows"
    # the tokenizer's BOS on a string prompt and the appended EOS are shown, as ids the step sees
    assert lines[1] == (f"[sft] first example as the model sees it: prompt {decoded(tokenizer, '<bos>1+1=')} "
                        f"-> response {decoded(tokenizer, '2<eos>')} (trained: 2 of 2 tokens)")


def test_a_conversation_shows_which_response_text_is_trained(tokenizer, tmp_path, capsys):
    conversation = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"},
                    {"role": "user", "content": "x2="}, {"role": "assistant", "content": "4"}]
    data = load(tokenizer, tmp_path, [{"messages": conversation}], "sft", max_response_length=16)
    print_data_start("sft", data, None, tokenizer)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[sft] data: 1 rows of 1 (0 skipped, 0 truncated)"
    response = decoded(tokenizer, "2<eos><|user|>x2=<|assistant|>4<eos>")
    assert lines[1] == (f"[sft] first example as the model sees it: prompt {decoded(tokenizer, '<bos><|user|>1+1=<|assistant|>')} "
                        f"-> response {response} (trained: 4 of 9 tokens); trained text {decoded(tokenizer, '2<eos>4<eos>')}")


def test_preference_pairs_show_both_responses(tokenizer, tmp_path, capsys):
    data = load(tokenizer, tmp_path, [{"prompt": "3+4=", "chosen": "7", "rejected": "8"}], "preference")
    print_data_start("dpo", data, None, tokenizer)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == (f"[dpo] first example as the model sees it: prompt {decoded(tokenizer, '<bos>3+4=')} "
                        f"-> chosen {decoded(tokenizer, '7<eos>')} | rejected {decoded(tokenizer, '8<eos>')}")


def test_rl_stages_show_the_prompt_from_its_token_ids_and_the_stop_ids(tokenizer, tmp_path, capsys):
    """ppo / grpo print the first prompt decoded from its ids (what the model reads after the
    tokenizer's own normalisation: here an unknown character), not the rendered text."""
    import types
    from rlhf_jax.pipeline.stages.skeletons import print_rollout_start
    from rlhf_jax.training.rollout import SamplingConfig

    data = load(tokenizer, tmp_path, [{"prompt": "1+1=?"}, {"prompt": "2+2="}], "prompt")
    assert "?" in data.columns["prompt_text"][0]  # the rendered text has it
    stop = tokenizer.convert_tokens_to_ids("=")
    setup = types.SimpleNamespace(batches=types.SimpleNamespace(data=data), tokenizer=tokenizer,
                                  algorithm=types.SimpleNamespace(sampling=SamplingConfig(
                                      eos_token_id=(tokenizer.eos_token_id, stop))))
    print_rollout_start("grpo", setup, ["my_reward (weight 1)"])
    lines = capsys.readouterr().out.splitlines()
    shown = repr(tokenizer.decode(tokenizer("1+1=?", add_special_tokens=True)["input_ids"]))
    assert "?" not in shown  # the character-level vocabulary has no '?'
    assert lines[1] == f"[grpo] first prompt as the model sees it: {shown}"
    assert lines[2] == f"[grpo] responses stop at: {tokenizer.eos_token!r} ({tokenizer.eos_token_id}), '=' ({stop})"
    assert lines[3] == "[grpo] scored by: my_reward (weight 1)"
