"""The README's "Your own task" files work together: its prompts.jsonl (a plain and a
conversational row) loads, and its my_reward.py scores both rows' completions."""
import re
import string
import textwrap
from pathlib import Path

import numpy as np

from rlhf_jax.pipeline.data import DataConfig, load_data
from rlhf_jax.pipeline.tokenizer import build_tokenizer
from rlhf_jax.rewards import RewardFunction, RewardScorer, math_answer

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
EXAMPLE = re.search(r"```text\nprompts\.jsonl\n(.*?)\nmy_reward\.py\n(.*?)```", README, re.S)


def test_the_readme_reward_function_scores_the_readme_rows(tmp_path):
    rows, code = (textwrap.dedent(part) for part in EXAMPLE.groups())
    (tmp_path / "prompts.jsonl").write_text(rows)
    namespace = {}
    exec(compile(code, "README.md my_reward.py", "exec"), namespace)
    tokenizer = build_tokenizer(tmp_path / "tokenizer", string.printable.strip() + " ")
    data = load_data(tmp_path / "prompts.jsonl", tokenizer, DataConfig(max_prompt_length=128),
                     cache_dir=str(tmp_path / "cache"))
    assert isinstance(data.columns["prompt"][1], list)  # the conversational row
    answers = data.columns["answer"]
    for function, text in ((math_answer, "\\boxed{{{}}}"), (namespace["correct"], "{}")):
        ids, mask = padded([tokenizer.convert_tokens_to_ids(list(text.format(answer))) + [tokenizer.eos_token_id]
                            for answer in answers], tokenizer.pad_token_id)
        scorer = RewardScorer([RewardFunction(function.__name__, function)], tokenizer)
        assert scorer(ids, mask, data.columns["prompt"], {"answer": answers})[0].tolist() == [1.0, 1.0]


def padded(rows, pad):
    width = max(map(len, rows))
    return (np.array([row + [pad] * (width - len(row)) for row in rows]),
            np.array([[1] * len(row) + [0] * (width - len(row)) for row in rows]))
