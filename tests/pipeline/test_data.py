"""Data loading: every row format, masks and padding, row-level errors, batching and resume.

The expected token ids come from an independent oracle: the test tokenizer gives ids 0..6 to
<pad> <eos> <bos> <unk> <|system|> <|user|> <|assistant|> and 7.. to the alphabet in order.
"""
import dataclasses
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_jax.typed_config import ConfigError, load_config
from rlhf_jax.pipeline.batching import BatchIterator, DataPosition
from rlhf_jax.pipeline.data import DataConfig, check_data_config, load_data
from rlhf_jax.pipeline.data_formats import DataError
from rlhf_jax.pipeline.tokenizer import build_tokenizer

ALPHABET = "0123456789+-=?! abcdefghijklmnopqrstuvwxyz"
PAD, EOS, BOS, SYSTEM, USER, ASSISTANT = 0, 1, 2, 4, 5, 6
CONFIG = DataConfig(max_prompt_length=10, max_response_length=6)


def ids(text):
    return [7 + ALPHABET.index(character) for character in text]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"), ALPHABET)


@pytest.fixture
def load(tokenizer, tmp_path):
    def load_rows(rows, suffix=".jsonl", config=CONFIG, skip_invalid=False, **options):
        config = dataclasses.replace(config, skip_invalid=skip_invalid)
        path = write(tmp_path / f"data{suffix}", rows)
        return path, load_data(path, tokenizer, config, cache_dir=str(tmp_path / "cache"), **options)

    return load_rows


def write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def expect_sequence(data, row, prompt, response, *, name="", trained=None):
    """Row `row` of `data` holds the prompt left-padded and the response right-padded in its
    slot (`name` "chosen_" 0, "rejected_" 1, "" (sft) 0); an sft row's loss mask is 1 on the
    (trained) response tokens only."""
    expect_prompt(data, row, prompt)
    slot = 1 if name == "rejected_" else 0
    response_ids, response_mask = (data.arrays[key][row, slot] for key in ("response_ids", "response_mask"))
    width = response_ids.shape[0]
    np.testing.assert_array_equal(response_ids, response + [PAD] * (width - len(response)))
    np.testing.assert_array_equal(response_mask, [1] * len(response) + [0] * (width - len(response)))
    assert response_ids.dtype == np.int32 and response_mask.dtype == np.int32
    assert data.arrays["response_ids"].shape[1] == (2 if name else 1)
    if not name:
        trained = [1] * len(response) if trained is None else trained
        loss_mask = data.arrays["loss_mask"][row, 0]
        np.testing.assert_array_equal(loss_mask, trained + [0] * (width - len(response)))
        assert loss_mask.dtype == np.float32
    else:
        assert "loss_mask" not in data.arrays


def expect_prompt(data, row, prompt):
    """Row `row` of `data` holds the prompt left-padded."""
    prompt_ids, prompt_mask = data.arrays["prompt_ids"][row], data.arrays["prompt_mask"][row]
    padding = prompt_ids.shape[0] - len(prompt)
    np.testing.assert_array_equal(prompt_ids, [PAD] * padding + prompt)
    np.testing.assert_array_equal(prompt_mask, [0] * padding + [1] * len(prompt))


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_string_preferences(load, suffix):
    rows = [
        {"prompt": "1+2=", "chosen": "3", "rejected": "4!"},
        {"prompt": "is 9+99=", "chosen": "108", "rejected": "nope"},
    ]
    _, data = load(rows, suffix)
    assert data.kind == "preference" and len(data) == 2
    for index, row in enumerate(rows):
        prompt = [BOS] + ids(row["prompt"])
        for name in ("chosen", "rejected"):
            expect_sequence(data, index, prompt, ids(row[name]) + [EOS], name=f"{name}_")
        expect_prompt(data, index, prompt)
    assert data.columns["prompt_text"] == ["1+2=", "is 9+99="]


def test_string_sft_and_prompts(load):
    _, sft = load([{"prompt": "2+2=", "completion": "4"}, {"prompt": "", "completion": "hi"}], ".json")
    assert sft.kind == "sft"
    expect_sequence(sft, 0, [BOS] + ids("2+2="), ids("4") + [EOS])
    expect_sequence(sft, 1, [BOS], ids("hi") + [EOS])
    _, prompts = load([{"prompt": "7+8=", "answer": "15"}, {"prompt": "abc", "answer": "x"}], ".parquet")
    assert prompts.kind == "prompt" and set(prompts.arrays) == {"prompt_ids", "prompt_mask"}
    expect_prompt(prompts, 0, [BOS] + ids("7+8="))
    assert prompts.columns["answer"] == ["15", "x"]


def test_completion_ending_with_eos_text_gets_one_eos(load):
    _, data = load([{"prompt": "1=", "completion": "1<eos>"}])
    response = data.arrays["response_ids"][0, 0, :3]
    np.testing.assert_array_equal(response, ids("1") + [EOS, PAD])


def test_conversational_preferences_with_explicit_prompt(load):
    system = [{"role": "system", "content": "be nice"}]
    rows = [{"prompt": system + user("1+1="), "chosen": assistant("2"), "rejected": assistant("11")}]
    prompt = [BOS, SYSTEM] + ids("be nice") + [USER] + ids("1+1=") + [ASSISTANT]
    _, data = load(rows, config=DataConfig(max_prompt_length=20, max_response_length=6))
    for name, answer in (("chosen", "2"), ("rejected", "11")):
        expect_sequence(data, 0, prompt, ids(answer) + [EOS], name=f"{name}_")
    expect_prompt(data, 0, prompt)
    assert data.columns["prompt_text"] == ["<bos><|system|>be nice<|user|>1+1=<|assistant|>"]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_conversational_preferences_with_shared_prefix(load, suffix):
    rows = [{"chosen": user("2+3=") + assistant("5"), "rejected": user("2+3=") + assistant("6")}]
    _, data = load(rows, suffix)
    prompt = [BOS, USER] + ids("2+3=") + [ASSISTANT]
    expect_sequence(data, 0, prompt, ids("5") + [EOS], name="chosen_")
    expect_sequence(data, 0, prompt, ids("6") + [EOS], name="rejected_")
    expect_prompt(data, 0, prompt)


def test_conversational_prompt_only_and_prompt_completion(load):
    _, prompts = load([{"prompt": user("9+9=")}], ".parquet")
    expect_prompt(prompts, 0, [BOS, USER] + ids("9+9=") + [ASSISTANT])
    _, sft = load([{"prompt": user("9+9="), "completion": assistant("18")}])
    expect_sequence(sft, 0, [BOS, USER] + ids("9+9=") + [ASSISTANT], ids("18") + [EOS])


def test_messages_train_every_assistant_turn(load):
    messages = user("1+1=") + assistant("2") + user("x2=") + assistant("4")
    _, data = load([{"messages": messages}], config=DataConfig(max_prompt_length=10, max_response_length=9))
    prompt = [BOS, USER] + ids("1+1=") + [ASSISTANT]
    response = ids("2") + [EOS, USER] + ids("x2=") + [ASSISTANT] + ids("4") + [EOS]
    expect_sequence(data, 0, prompt, response, trained=[1, 1, 0, 0, 0, 0, 0, 1, 1])
    expect_prompt(data, 0, prompt)


def test_empty_prompt_takes_the_first_response_token(load):
    """A conversation that opens with the assistant renders no prompt text: its first token
    (here the template's BOS) becomes the prompt, since nothing predicts it."""
    messages = assistant("hi") + user("1") + assistant("2")
    _, data = load([{"messages": messages}], config=DataConfig(max_prompt_length=4, max_response_length=10))
    response = [ASSISTANT] + ids("hi") + [EOS, USER] + ids("1") + [ASSISTANT] + ids("2") + [EOS]
    expect_sequence(data, 0, [BOS], response, trained=[1, 1, 1, 1, 0, 0, 0, 1, 1])


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_text_rows_train_every_token_after_the_bos(load, suffix):
    """TRL's language-modeling rows: the tokenizer's BOS is the prompt, the text and its EOS
    the trained response (as TRL's `text + eos` tokenised with special tokens, labels all)."""
    _, data = load([{"text": "1+2=3"}, {"text": "ab<eos>"}], suffix)
    assert data.kind == "sft" and len(data) == 2
    expect_sequence(data, 0, [BOS], ids("1+2=3") + [EOS])
    expect_sequence(data, 1, [BOS], ids("ab") + [EOS])
    assert data.columns["prompt_text"] == ["", ""]


def test_text_rows_without_a_bos_start_from_the_first_token(tmp_path):
    """Without a BOS nothing predicts the text's first token: it is the prompt."""
    tokenizer = build_tokenizer(tmp_path / "tokenizer", ALPHABET)
    tokenizer.add_bos_token = False
    assert tokenizer("ab")["input_ids"] == ids("ab")
    path = write(tmp_path / "data.jsonl", [{"text": "1+2=3"}])
    data = load_data(path, tokenizer, CONFIG, cache_dir=str(tmp_path / "cache"))
    expect_sequence(data, 0, ids("1"), ids("+2=3") + [EOS])


@pytest.mark.parametrize("row, message", [
    ({"text": ""}, "row 1: field 'text' is empty"),
    ({"text": ["a", "b"]}, "row 1: field 'text' must be a string, got list"),
    ({"text": "ab", "prompt": "1"}, "row 1: field 'completion' is missing (the row has: text, prompt)"),
])
def test_bad_text_rows(load, row, message):
    with pytest.raises(DataError, match=re.escape(message)):
        load([row], kind="sft")


def test_long_response_is_truncated_and_counted(load):
    _, data = load([{"prompt": "1=", "completion": "abcdefgh"}, {"prompt": "1=", "completion": "ab"}])
    assert data.stats.num_truncated == 1
    expect_sequence(data, 0, [BOS] + ids("1="), ids("abcdef"))  # EOS cut
    expect_sequence(data, 1, [BOS] + ids("1="), ids("ab") + [EOS])


def test_several_files_are_concatenated(tokenizer, tmp_path):
    first = write(tmp_path / "a.jsonl", [{"prompt": "1=", "completion": "1", "id": "a"}])
    second_rows = [{"prompt": "2=", "completion": "2"}, {"prompt": "3=", "completion": "3"}]
    second = write(tmp_path / "b.parquet", second_rows)
    data = load_data([first, second], tokenizer, CONFIG, cache_dir=str(tmp_path / "cache"))
    assert len(data) == 3 and data.sources == [(str(first), 1), (str(second), 1), (str(second), 2)]
    assert data.columns["id"] == ["a", None, None]
    bad = write(tmp_path / "c.jsonl", [{"prompt": "2=", "completion": "2"}, {"prompt": "3="}])
    with pytest.raises(DataError, match=rf"^{bad} row 2: field 'completion' is missing \(the row has: prompt\)$"):
        load_data([first, bad], tokenizer, CONFIG, cache_dir=str(tmp_path / "cache"))


def test_format_is_forced_by_config(load):
    rows = [{"prompt": "1=", "completion": "1"}]
    _, data = load(rows, config=DataConfig(format="prompt", max_prompt_length=10, max_response_length=6))
    assert data.kind == "prompt"
    with pytest.raises(DataError, match="are SFT data .* but this stage takes preference data"):
        load(rows, kind="preference")


# ----------------------------------------------------------------------------- malformed rows

GOOD = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}
GOOD_CHAT = {"prompt": user("1+1="), "chosen": assistant("2"), "rejected": assistant("3")}


def chat(prompt, chosen, rejected):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


@pytest.mark.parametrize(
    "bad_row, message, good",
    [
        ({"prompt": "1+1=", "rejected": "3"}, "field 'chosen' is missing", GOOD),
        ({**GOOD, "chosen": 5}, "field 'chosen' must be a string or a list", GOOD),
        ({**GOOD, "chosen": ""}, "field 'chosen' is empty", GOOD),
        ({**GOOD, "prompt": "123456789+1="}, "prompt has 13 tokens, more than max_prompt_length=10", GOOD),
        ({**GOOD, "chosen": assistant("2")}, "mix plain strings and message lists", GOOD),
        ('{"prompt": "1+1=", "chosen": "2"', "not valid JSON", GOOD),
        ("[1, 2]", "must be a JSON object", GOOD),
        ({**GOOD_CHAT, "chosen": [{"role": "assistant"}]}, "message 0: 'content' must be", GOOD_CHAT),
        ({**GOOD_CHAT, "chosen": [{"role": 1, "content": "2"}]}, "message 0: 'role' must be", GOOD_CHAT),
        ({**GOOD_CHAT, "chosen": ["2"]}, "message 0 must be a mapping", GOOD_CHAT),
        ({**GOOD_CHAT, "chosen": assistant("")}, "field 'chosen' has an empty assistant message", GOOD_CHAT),
        ({**GOOD_CHAT, "chosen": user("2")}, "field 'chosen' has no assistant message", GOOD_CHAT),
        ({**GOOD_CHAT, "chosen": assistant("2") + user("3")}, "field 'chosen' ends with a user message; end it "
         "with the assistant message to train", GOOD_CHAT),
        ({**GOOD_CHAT, "prompt": [{"role": "tool", "content": "1"}]}, "chat template failed", GOOD_CHAT),
        (chat(None, user("1") + assistant("2"), user("2") + assistant("3")), "share no leading", GOOD_CHAT),
        (chat(None, user("1") + assistant("2"), user("1")), "'rejected' has no messages after", GOOD_CHAT),
        (chat(None, user("1") + assistant("2") + user("3") + assistant("4"),
              user("1") + assistant("2") + user("5") + assistant("6")),
         "'chosen' and 'rejected' first differ at message 2, a user message in 'chosen'", GOOD_CHAT),
        ({**GOOD_CHAT, "chosen": [{"role": "assistant", "content": None}]}, "'content' must be a string, got null",
         GOOD_CHAT),
        ({**GOOD_CHAT, "chosen": []}, "empty list of messages", GOOD_CHAT),
    ],
)
def test_malformed_row_names_file_and_row(load, tmp_path, bad_row, message, good):
    rows = [good, good, bad_row, good]
    with pytest.raises(DataError) as error:
        load(rows)
    assert str(error.value).startswith(f"{tmp_path / 'data.jsonl'} row 3: ")
    assert message in str(error.value)
    path, data = load(rows, skip_invalid=True)
    assert (data.stats.num_rows, data.stats.num_used, data.stats.num_skipped) == (4, 3, 1)
    assert data.sources == [(str(path), 1), (str(path), 2), (str(path), 4)]
    assert message in data.stats.skipped_reasons[0]


def test_malformed_parquet_row_names_file_and_row(load, tmp_path):
    rows = [GOOD, {"prompt": "1+1=", "chosen": None, "rejected": "3"}]
    with pytest.raises(DataError, match=f"^{tmp_path / 'data.parquet'} row 2: field 'chosen' is missing"):
        load(rows, ".parquet")


def test_messages_row_errors(load):
    with pytest.raises(DataError, match="row 1: field 'messages' has no assistant message"):
        load([{"messages": user("1")}])
    # a prompt row the chat template refuses (an RL or eval prompt file) names its row too
    with pytest.raises(DataError, match="row 1: the chat template failed"):
        load([{"prompt": [{"role": "tool", "content": "1"}]}], kind="prompt")
    # a trailing user turn: the EOS appended after it would teach the model to stop there
    with pytest.raises(DataError, match="row 1: field 'messages' ends with a user message"):
        load([{"messages": user("1") + assistant("2") + user("3")}], kind="sft")
    with pytest.raises(DataError, match="row 1: field 'messages' must be a list"):
        load([{"messages": "hello"}])


def test_mixed_type_column_keeps_exact_values(load):
    """A column mixing strings and numbers: the string "12" must stay the string "12"."""
    rows = [{"prompt": "1=", "chosen": "12", "rejected": "3"}, {"prompt": "1=", "chosen": 5, "rejected": "3"}]
    with pytest.raises(DataError, match="row 2: field 'chosen' must be"):
        load(rows)
    _, data = load(rows, skip_invalid=True)
    assert data.stats.num_skipped == 1
    np.testing.assert_array_equal(data.arrays["response_ids"][0, 0, :3], ids("12") + [EOS])


def test_skip_invalid_counts_several(load):
    rows = [GOOD, {"prompt": "1"}, GOOD, "{oops", GOOD, {"prompt": "1", "chosen": "", "rejected": "2"}]
    _, data = load(rows, skip_invalid=True)
    assert (data.stats.num_used, data.stats.num_skipped) == (3, 3)
    assert [row for _, row in data.sources] == [1, 3, 5]
    assert len(data.stats.skipped_reasons) == 3


def test_all_rows_invalid_is_an_error(load):
    with pytest.raises(DataError, match="no valid rows"):
        load([{"prompt": "1", "chosen": "2"}], skip_invalid=True, kind="preference")


def test_conversational_rows_need_a_chat_template(tokenizer, tmp_path):
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        path = write(tmp_path / "chat.jsonl", [GOOD_CHAT])
        with pytest.raises(DataError, match="row 1: .*chat template") as error:
            load_data(path, tokenizer, CONFIG, cache_dir=str(tmp_path / "cache"))
        assert f"the tokenizer of {tokenizer.name_or_path} has none" in str(error.value)  # names the folder
    finally:
        tokenizer.chat_template = template


def test_file_level_errors(tokenizer, tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_data(tmp_path / "missing.jsonl", tokenizer, CONFIG)
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_data(write(tmp_path / "x.jsonl", [GOOD]).rename(tmp_path / "x.csv"), tokenizer, CONFIG)
    questions = write(tmp_path / "q.jsonl", [{"question": "1"}])
    with pytest.raises(DataError, match=r"cannot tell the format from the columns \['question'\]"):
        load_data(questions, tokenizer, CONFIG, cache_dir=str(tmp_path / "cache"))
    (tmp_path / "broken.json").write_text('[{"prompt": "1"}, {"prompt": ')
    with pytest.raises(DataError, match=f"^{tmp_path / 'broken.json'}: not valid JSON"):
        load_data(tmp_path / "broken.json", tokenizer, CONFIG, cache_dir=str(tmp_path / "cache"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: the file holds no rows"):
        load_data(tmp_path / "empty.jsonl", tokenizer, CONFIG, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="no data files"):
        load_data([], tokenizer, CONFIG)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"max_prompt_length": 0}, "max_prompt_length"),
        ({"max_response_length": 0}, "max_response_length"),
        ({"bucket_multiple": -1}, "bucket_multiple"),
        ({"format": "csv"}, "format"),
    ],
)
def test_bad_data_config(change, field):
    with pytest.raises(ValueError, match=field):
        check_data_config(DataConfig(**change))


def test_data_config_from_yaml(tmp_path):
    path = tmp_path / "data.yaml"
    path.write_text("train_files: [a.jsonl]\nmax_prompt_length: 16\n")
    config = load_config(DataConfig, path, ["skip_invalid=true", "format=sft"])
    expected = DataConfig(train_files=["a.jsonl"], max_prompt_length=16, skip_invalid=True, format="sft")
    assert config == expected
    with pytest.raises(ConfigError, match="max_prompt_len"):
        load_config(DataConfig, path, ["max_prompt_len=3"])


# ----------------------------------------------------------------------------- batching


@pytest.fixture(scope="module")
def numbered(tokenizer, tmp_path_factory):
    """30 SFT rows whose prompt and response lengths vary."""
    folder = tmp_path_factory.mktemp("numbered")
    rows = [{"prompt": "n" * (1 + i % 5) + "=", "completion": str(i)} for i in range(30)]
    return load_data(write(folder / "n.jsonl", rows), tokenizer, CONFIG, cache_dir=str(folder / "cache"))


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def test_each_epoch_visits_every_row_once(numbered):
    iterator = BatchIterator(numbered, 6, seed=1)
    assert iterator.batches_per_epoch == 5
    epochs = [np.concatenate([batch["row_index"] for batch in take(iterator, 5)]) for _ in range(2)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(30))
    assert epochs[0].tolist() != epochs[1].tolist()
    assert iterator.position == DataPosition(1, 5)
    first = next(iterator)
    np.testing.assert_array_equal(first["response_ids"], numbered.arrays["response_ids"][first["row_index"]])


def test_same_seed_same_batches_other_seed_differs(numbered):
    same = [b["row_index"].tolist() for b in take(BatchIterator(numbered, 6, seed=2), 7)]
    again = [b["row_index"].tolist() for b in take(BatchIterator(numbered, 6, seed=2), 7)]
    other = [b["row_index"].tolist() for b in take(BatchIterator(numbered, 6, seed=3), 7)]
    assert same == again and same != other
    ordered = take(BatchIterator(numbered, 6, shuffle=False), 2)
    assert ordered[1]["row_index"].tolist() == list(range(6, 12))


@pytest.mark.parametrize("stop", [0, 3, 5, 8])
def test_resume_reproduces_the_batches(numbered, stop):
    reference = BatchIterator(numbered, 4, seed=5, drop_last=False)
    expected = take(reference, 20)
    interrupted = BatchIterator(numbered, 4, seed=5, drop_last=False)
    take(interrupted, stop)
    resumed = BatchIterator(numbered, 4, seed=5, drop_last=False, position=interrupted.position)
    for want, got in zip(expected[stop:], take(resumed, 20 - stop)):
        assert want.keys() == got.keys()
        for name in want:
            np.testing.assert_array_equal(want[name], got[name])
    restored = BatchIterator(numbered, 4, seed=5, drop_last=False)
    restored.restore(DataPosition(1, 2))
    np.testing.assert_array_equal(next(restored)["row_index"], expected[8 + 2]["row_index"])


@pytest.mark.parametrize("process_count", [2, 3])
def test_processes_take_disjoint_slices_of_the_global_batch(numbered, process_count):
    global_batches = take(BatchIterator(numbered, 6, seed=7), 6)
    shards = [
        take(BatchIterator(numbered, 6, seed=7, process_index=index, process_count=process_count), 6)
        for index in range(process_count)
    ]
    for step, batch in enumerate(global_batches):
        for name in batch:
            joined = np.concatenate([shard[step][name] for shard in shards])
            np.testing.assert_array_equal(joined, batch[name])
    assert shards[0][0]["response_ids"].shape[0] == 6 // process_count


def test_last_batch_is_padded_when_not_dropped(numbered):
    iterator = BatchIterator(numbered, 8, shuffle=False, drop_last=False)
    assert iterator.batches_per_epoch == 4
    last = list(iterator.epoch_batches())[-1]
    assert last["row_index"].tolist() == [24, 25, 26, 27, 28, 29, -1, -1]
    assert last["example_mask"].tolist() == [1] * 6 + [0] * 2
    assert (last["response_ids"][6:] == PAD).all() and (last["prompt_ids"][6:] == PAD).all()
    for name in ("response_mask", "loss_mask", "prompt_mask"):
        assert (last[name][6:] == 0).all()
    assert iterator.position == DataPosition(0, 4)
    assert next(iterator)["row_index"].tolist() == list(range(8))


def test_training_completes_the_last_batch_with_the_epochs_first_rows(numbered):
    """`fill="repeat"` (training with `data.drop_last: false`): every row of the last batch is
    real, the epoch's first rows again; a batch larger than the data cycles through it."""
    iterator = BatchIterator(numbered, 8, seed=2, drop_last=False, fill="repeat")
    batches = list(iterator.epoch_batches())
    order = np.concatenate([batch["row_index"] for batch in batches[:-1]])
    last = batches[-1]
    assert last["row_index"].tolist() == [*np.random.default_rng([2, 0]).permutation(30)[24:].tolist(),
                                          *order[:2].tolist()]
    assert last["example_mask"].tolist() == [1.0] * 8
    np.testing.assert_array_equal(last["response_ids"][6:], numbered.arrays["response_ids"][order[:2]])
    small = BatchIterator(numbered, 64, shuffle=False, drop_last=False, fill="repeat")
    assert next(small)["row_index"].tolist() == [row % 30 for row in range(64)]
    assert BatchIterator.from_config(numbered, DataConfig(drop_last=False), 8).fill == "repeat"
    with pytest.raises(ValueError, match="fill"):
        BatchIterator(numbered, 8, fill="pad")


def test_bucketing_trims_only_padding(numbered):
    full = take(BatchIterator(numbered, 6, seed=1), 5)
    trimmed = take(BatchIterator(numbered, 6, seed=1, bucket_multiple=4), 5)
    for whole, cut in zip(full, trimmed):
        for name in ("response_ids", "response_mask", "loss_mask"):
            width = cut[name].shape[-1]
            assert width % 4 == 0 and width <= whole[name].shape[-1]
            np.testing.assert_array_equal(cut[name], whole[name][..., :width])
            assert (whole["response_mask"][..., width:] == 0).all()
            assert whole["response_mask"][..., width - 4 :].any()
        width = cut["prompt_ids"].shape[1]
        np.testing.assert_array_equal(cut["prompt_ids"], whole["prompt_ids"][:, -width:])
        assert (whole["prompt_mask"][:, :-width] == 0).all()
        assert whole["prompt_mask"][:, -width:][:, :4].any()


def test_iterator_from_config(numbered):
    config = DataConfig(shuffle=False, drop_last=False, bucket_multiple=4)
    iterator = BatchIterator.from_config(numbered, config, 8, seed=3)
    assert (iterator.shuffle, iterator.drop_last, iterator.bucket_multiple, iterator.seed) == (False, False, 4, 3)
    assert iterator.batches_per_epoch == 4


def test_fixed_shapes_compile_once(numbered):
    jax = pytest.importorskip("jax")
    traces = []

    def count_tokens(batch):
        traces.append(1)
        return (batch["loss_mask"] * batch["response_mask"]).sum()

    counted = jax.jit(count_tokens)
    iterator = BatchIterator(numbered, 6, seed=1, drop_last=False)
    total = sum(float(counted({k: v for k, v in batch.items()})) for batch in take(iterator, 10))
    assert len(traces) == 1
    assert total == 2 * numbered.arrays["loss_mask"].sum()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 5, "process_count": 2}, "divisible"),
        ({"batch_size": 4, "process_index": 2, "process_count": 2}, "process_index"),
        ({"batch_size": 40}, "fewer than one batch"),
        ({"batch_size": 4, "bucket_multiple": -2}, "bucket_multiple"),
        ({"batch_size": 4, "position": DataPosition(0, 9)}, "outside"),
    ],
)
def test_bad_iterator_arguments(numbered, options, message):
    batch_size = options.pop("batch_size")
    with pytest.raises(ValueError, match=message):
        BatchIterator(numbered, batch_size, **options)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_prompt_data_keeps_every_column_for_reward_functions(load, suffix):
    rows = [{"prompt": "1+2=", "answer": "3", "level": 1}, {"prompt": user("9+9="), "answer": "18", "level": 2}]
    if suffix == ".parquet":  # one type per parquet column: plain prompts only
        rows = [rows[0], {"prompt": "9+9=", "answer": "18", "level": 2}]
    _, data = load(rows, suffix, kind="prompt")
    assert data.columns["answer"] == ["3", "18"] and data.columns["level"] == [1, 2]
    assert data.columns["prompt"] == [row["prompt"] for row in rows]  # as given: text or messages
    batch = next(BatchIterator(data, 2, shuffle=False))
    assert [data.columns["answer"][row] for row in batch["row_index"]] == ["3", "18"]
    if suffix != ".parquet":  # the conversational row went through the chat template
        expect_prompt(data, 1, [BOS, USER] + ids("9+9=") + [ASSISTANT])


def test_a_save_to_disk_folder_is_prompt_data(tokenizer, tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_list([{"prompt": "1+2=", "answer": "3"}, {"prompt": "4+4=", "answer": "8"}]).save_to_disk(
        str(folder))
    data = load_data(folder, tokenizer, CONFIG, kind="prompt")
    assert data.columns["answer"] == ["3", "8"] and data.sources == [(str(folder), 1), (str(folder), 2)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "5+5="}])}).save_to_disk(
        str(tmp_path / "dict"))
    assert load_data(tmp_path / "dict", tokenizer, CONFIG, kind="prompt").columns["prompt"] == ["5+5="]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not one written by datasets' save_to_disk"):
        load_data(tmp_path / "empty", tokenizer, CONFIG, kind="prompt")


@pytest.mark.parametrize("rows, kind, message", [
    ([{"prompt": "1+2=", "chosen": "3", "rejected": "4"}], "sft",
     "are preference data (prompt/chosen/rejected), but this stage takes SFT data"),
    ([{"prompt": "1+2=", "completion": "3"}], "preference",
     "are SFT data (prompt/completion, messages or text), but this stage takes preference data"),
    ([{"messages": [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]}], "prompt",
     "are SFT data (prompt/completion, messages or text), but this stage takes prompt data"),
    ([{"text": "1+2=3"}], "prompt", "are SFT data (prompt/completion, messages or text), but this stage takes "
     "prompt data"),
])
def test_another_kind_of_data_is_named_as_such(load, rows, kind, message):
    with pytest.raises(DataError, match=r"data\.jsonl: the columns \[.*\] " + re.escape(message)):
        load(rows, kind=kind)


def test_a_row_missing_a_field_of_the_right_kind_is_still_a_row_error(load):
    with pytest.raises(DataError, match="row 1: field 'chosen' is missing"):
        load([{"prompt": "1+2=", "rejected": "4"}], kind="preference")


def test_identical_pairs_and_truncated_rows_are_counted_in_one_warning_each(load, caplog):
    """Pair 2 is identical as written, pair 3 once cut to 6 tokens (its responses differ only
    in the 7th character); pair 1 differs. Truncation counts rows, not responses."""
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"},
            {"prompt": "1+2=", "chosen": "3", "rejected": "3"},
            {"prompt": "1+3=", "chosen": "abcdefg", "rejected": "abcdefh"}]
    with caplog.at_level("WARNING", logger="rlhf_jax.pipeline.data"):
        path, _ = load(rows)
    messages = [record.getMessage() for record in caplog.records]
    assert "1 rows of 3 have a response longer than max_response_length=6, truncated" in messages, messages
    assert (f"2 pairs of 3 have the same chosen and rejected response (as tokenised and truncated to "
            f"max_response_length=6), so they train nothing; first: {path} row 2") in messages, messages


def test_a_prompt_with_its_own_bos_warns_once(load, caplog):
    """A string prompt already rendered by a chat template holds the BOS, and the tokenizer
    adds its own: one warning line naming the count and the first row (the data still loads)."""
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"},
            {"prompt": "<bos>1+2=", "chosen": "3", "rejected": "4"},
            {"prompt": "<bos>1+3=", "chosen": "4", "rejected": "5"}]
    with caplog.at_level("WARNING", logger="rlhf_jax.pipeline.data"):
        path, data = load(rows)
    assert data.arrays["prompt_ids"][1][data.arrays["prompt_mask"][1] > 0][:2].tolist() == [2, 2]
    warnings = [record.getMessage() for record in caplog.records if "BOS" in record.getMessage()]
    assert warnings == [f"2 prompts of 3 start with the BOS token twice (a prompt string that holds its own BOS, "
                        f"e.g. already rendered by a chat template, also gets the tokenizer's); give such rows as "
                        f"messages, or their text without the BOS; first: {path} row 2"]
