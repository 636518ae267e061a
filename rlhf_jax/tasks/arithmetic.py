"""The built-in task: multi-digit addition with a verifiable gold reward.

A prompt is `"12+345="`; the right completion is `"357"` followed by the EOS token. Operands
have between `min_digits` and `max_digits` digits (the digit count is drawn uniformly, then
the value), which sets the difficulty. Everything is generated locally and deterministically
from `TaskConfig.seed`, and written as ordinary data files that go through the same loading
code as a user's data (`rlhf_jax.pipeline.data`):

    output_dir/
      tokenizer/               Hugging Face tokenizer folder (character level, chat template)
      sft.jsonl                {"prompt", "completion"}: noisy demonstrations
      preferences.jsonl        {"prompt", "chosen", "rejected"}: pairs the gold scorer orders
      prompts.jsonl            {"prompt"}: prompts for PPO / GRPO
      eval_prompts.jsonl       {"prompt", "answer"}: held-out prompts with the right answer
      eval_preferences.jsonl   held-out pairs (reward-model accuracy)
      task_config.json         the TaskConfig used

With `format="conversational"` the same content is written as role/content messages
(`messages` for SFT, message lists for `prompt`/`chosen`/`rejected`).

Noise: a fraction `sft_noise_rate` of the demonstrations has a corrupted answer, so SFT is
imperfect and reinforcement learning has something to fix. Preference pairs are two candidate
answers, each corrupted with probability `preference_noise_rate`, ordered by the gold scorer
(`preference_reward`); ties are discarded. Corruptions (`corruptions`):

    digit       one digit replaced by another             357 -> 397
    off_by_one  the sum plus or minus 1 or 10             357 -> 356, 367
    no_carry    digit-wise sum ignoring carries           58+67: 125 -> 15
    drop        one digit left out                        357 -> 37
    extra       text after the answer (a digit, "+d", or the answer repeated)

Held-out problems (eval prompts and eval preferences) never appear in a training split.

The gold scorer `gold_reward(prompt, completion, answer=...)` reads the completion up to the
EOS token and returns 1.0 for exactly the right sum (all operands of `a+b(+c...)=`, or the
row's `answer` when given), else 0.0; `kind="graded"` gives partial credit (share of right
digits, a penalty without EOS). `gold_rewards` scores a batch; `correct` is the TRL-style
reward function (`rlhf_jax.tasks.arithmetic:correct` in a config). `TASK` is the task behind
the `rlhf_jax.pipeline.tasks.Task` interface.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from rlhf_jax.pipeline.tasks import Task, TaskFiles, write_config, write_jsonl
from rlhf_jax.pipeline.tokenizer import EOS_TOKEN, build_tokenizer

TASK_ALPHABET = "0123456789+="
CORRUPTIONS = ("digit", "off_by_one", "no_carry", "drop", "extra")


_PROBLEM = re.compile(r"(\d+(?:\+\d+)+)=")


def parse_problem(prompt: str) -> tuple[int, ...]:
    """All operands of the last `a+b(+c...)=` in `prompt` (plain or chat-rendered).

    Raises ValueError when the prompt holds no addition problem.
    """
    matches = _PROBLEM.findall(prompt)
    if not matches:
        raise ValueError(f"prompt {prompt!r} holds no addition problem like '12+345='")
    return tuple(int(operand) for operand in matches[-1].split("+"))


def gold_reward(
    prompt: str,
    completion: str,
    *,
    kind: str = "exact",
    eos_token: str = EOS_TOKEN,
    require_eos: bool = True,
    no_eos_score: float = -1.0,
    answer: str | None = None,
) -> float:
    """The verifiable reward of `completion` for the addition problem in `prompt`.

    The target is `answer` when given (the prompt row's reference), else the sum of all
    operands of the prompt's last `a+b(+c...)=`. The completion's answer is its text before
    the first `eos_token` (anything after it, such as padding, is ignored). A completion
    without `eos_token` did not stop: it scores 0.0 under "exact" and `no_eos_score` under
    "graded", unless `require_eos=False` (for completions already cut at EOS), in which case
    the whole text is the answer.

    Kinds:
      exact:  1.0 if the answer is exactly the target (no spaces, no leading zeros), else 0.0.
      graded: the share of correct characters, aligned from the right (units under units):
              `matches / max(len(answer), len(target))`, so exactly right is 1.0, an empty
              answer 0.0, a missing EOS `no_eos_score` (a penalty, -1.0 by default).
    """
    if kind not in ("exact", "graded"):
        raise ValueError(f"kind must be 'exact' or 'graded', got {kind!r}")
    target = str(answer).strip() if answer is not None else str(sum(parse_problem(prompt)))
    stop = completion.find(eos_token)
    if stop < 0 and require_eos:
        return 0.0 if kind == "exact" else float(no_eos_score)
    answer = completion if stop < 0 else completion[:stop]
    if kind == "exact" or answer == target:
        return 1.0 if answer == target else 0.0
    matches = sum(x == y for x, y in zip(reversed(answer), reversed(target)))
    return matches / max(len(answer), len(target))


def gold_rewards(prompts: Sequence[str], completions: Sequence[str], **options) -> np.ndarray:
    """`gold_reward` over a batch: float32 array [batch]; `options` as in `gold_reward`."""
    if len(prompts) != len(completions):
        raise ValueError(f"prompts and completions differ in length: {len(prompts)} vs {len(completions)}")
    return np.asarray(
        [gold_reward(prompt, completion, **options) for prompt, completion in zip(prompts, completions)],
        dtype=np.float32,
    )


@dataclass
class TaskConfig:
    """How the built-in addition task is generated (lives under `task:` in the YAML).

    With the defaults, a 2-layer, d_model 128 transformer trained for 2,500 SFT steps of 64
    rows learns the sums well (greedy pass@1 about 0.7 on held-out prompts) but also learns to
    imitate the corrupted demonstrations, so its sampled (temperature 1) pass@1 is about 0.45:
    the room that reward-driven training can recover. Fewer SFT rows make the model memorise
    them (and generalise worse); `max_digits` and `sft_noise_rate` move both numbers.
    """

    seed: int = 0
    min_digits: int = 1  # fewest digits of an operand
    max_digits: int = 3  # most digits of an operand (difficulty)
    num_sft: int = 20000  # demonstrations in sft.jsonl
    num_preferences: int = 10000  # pairs in preferences.jsonl
    num_prompts: int = 4000  # prompts in prompts.jsonl
    num_eval_prompts: int = 256  # held-out prompts in eval_prompts.jsonl
    num_eval_preferences: int = 256  # held-out pairs in eval_preferences.jsonl
    sft_noise_rate: float = 0.35  # share of demonstrations with a corrupted answer
    preference_noise_rate: float = 0.5  # chance each preference candidate is corrupted
    preference_reward: Literal["exact", "graded"] = "exact"  # scorer ordering the pairs
    corruptions: tuple[str, ...] = CORRUPTIONS  # kinds of corruption to draw from
    format: Literal["string", "conversational"] = "string"


def validate_task_config(config: TaskConfig) -> None:
    """Raise ValueError naming the first TaskConfig field that is out of range."""
    if not 1 <= config.min_digits <= config.max_digits <= 9:
        raise ValueError(
            f"need 1 <= min_digits <= max_digits <= 9, got min_digits={config.min_digits}, "
            f"max_digits={config.max_digits}"
        )
    for name in ("num_sft", "num_preferences", "num_prompts", "num_eval_prompts", "num_eval_preferences"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(config, name)}")
    if not 0.0 <= config.sft_noise_rate <= 1.0:
        raise ValueError(f"sft_noise_rate must be in [0, 1], got {config.sft_noise_rate}")
    if not 0.0 < config.preference_noise_rate < 1.0:
        raise ValueError(
            "preference_noise_rate must be in (0, 1) so that pairs differ, "
            f"got {config.preference_noise_rate}"
        )
    if config.preference_reward not in ("exact", "graded"):
        raise ValueError(f"preference_reward must be 'exact' or 'graded', got {config.preference_reward!r}")
    if config.format not in ("string", "conversational"):
        raise ValueError(f"format must be 'string' or 'conversational', got {config.format!r}")
    unknown = [kind for kind in config.corruptions if kind not in CORRUPTIONS]
    if unknown or not config.corruptions:
        raise ValueError(f"corruptions must be a non-empty subset of {CORRUPTIONS}, got {config.corruptions}")
    held_out = config.num_eval_prompts + config.num_eval_preferences
    if held_out > _num_problems(config) // 2:
        raise ValueError(
            f"{held_out} held-out problems is more than half of the {_num_problems(config)} "
            f"possible problems with {config.min_digits}-{config.max_digits} digit operands"
        )


def _num_problems(config: TaskConfig) -> int:
    low = 0 if config.min_digits == 1 else 10 ** (config.min_digits - 1)
    return (10**config.max_digits - low) ** 2


def _draw_operand(rng: np.random.Generator, config: TaskConfig) -> int:
    digits = int(rng.integers(config.min_digits, config.max_digits + 1))
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return int(rng.integers(low, 10**digits))


def _draw_problems(rng, config, count, *, exclude=frozenset(), unique=False) -> list[tuple[int, int]]:
    """`count` problems (a, b), none in `exclude`, all distinct when `unique`."""
    problems, seen = [], set()
    while len(problems) < count:
        problem = (_draw_operand(rng, config), _draw_operand(rng, config))
        if problem in exclude or (unique and problem in seen):
            continue
        seen.add(problem)
        problems.append(problem)
    return problems


def corrupt_answer(rng: np.random.Generator, a: int, b: int, kind: str) -> str:
    """A wrong answer text for `a + b` made by corruption `kind` (see module docstring).

    The result always differs from `str(a + b)`; a kind that cannot change this answer
    (e.g. `no_carry` without a carry) falls back to `digit`.
    """
    answer = str(a + b)
    if kind == "off_by_one":
        deltas = [delta for delta in (-10, -1, 1, 10) if a + b + delta >= 0]
        return str(a + b + int(rng.choice(deltas)))
    if kind == "no_carry":
        width = max(len(str(a)), len(str(b)))
        digits = [(int(x) + int(y)) % 10 for x, y in zip(str(a).zfill(width), str(b).zfill(width))]
        wrong = str(int("".join(map(str, digits))))
        return wrong if wrong != answer else corrupt_answer(rng, a, b, "digit")
    if kind == "drop":
        if len(answer) < 2:
            return corrupt_answer(rng, a, b, "extra")
        position = int(rng.integers(len(answer)))
        return answer[:position] + answer[position + 1 :]
    if kind == "extra":
        style = int(rng.integers(3))
        if style == 0:
            return answer + str(int(rng.integers(10)))
        if style == 1:
            return answer + "+" + str(int(rng.integers(10)))
        return answer + answer
    if kind == "digit":
        position = int(rng.integers(len(answer)))
        replacement = str((int(answer[position]) + int(rng.integers(1, 10))) % 10)
        return answer[:position] + replacement + answer[position + 1 :]
    raise ValueError(f"corruption kind must be one of {CORRUPTIONS}, got {kind!r}")


def _candidate(rng, config: TaskConfig, a: int, b: int, noise_rate: float) -> str:
    if rng.random() < noise_rate:
        return corrupt_answer(rng, a, b, str(rng.choice(list(config.corruptions))))
    return str(a + b)


def make_splits(config: TaskConfig) -> dict[str, list[dict]]:
    """The task's rows as plain dicts, keyed by split name (deterministic in `config.seed`).

    Every split has its own random stream, so changing one split's size leaves the others'
    content unchanged (training splits exclude the held-out problems, which are drawn first).
    """
    validate_task_config(config)

    def stream(index: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([config.seed, index]))

    eval_problems = _draw_problems(stream(0), config, config.num_eval_prompts, unique=True)
    eval_pair_problems = _draw_problems(
        stream(1), config, config.num_eval_preferences, exclude=frozenset(eval_problems), unique=True
    )
    held_out = frozenset(eval_problems) | frozenset(eval_pair_problems)

    sft_rng = stream(2)
    sft = [
        _row(config, a, b, completion=_candidate(sft_rng, config, a, b, config.sft_noise_rate))
        for a, b in _draw_problems(sft_rng, config, config.num_sft, exclude=held_out)
    ]
    prompt_problems = _draw_problems(stream(3), config, config.num_prompts, exclude=held_out)
    prompts = [_row(config, a, b) for a, b in prompt_problems]
    eval_prompts = [_row(config, a, b, answer=str(a + b)) for a, b in eval_problems]
    preferences = _preference_rows(stream(4), config, config.num_preferences, exclude=held_out)
    eval_preferences = _held_out_preference_rows(stream(5), config, eval_pair_problems)
    return {
        "sft": sft,
        "preferences": preferences,
        "prompts": prompts,
        "eval_prompts": eval_prompts,
        "eval_preferences": eval_preferences,
    }


def _ordered_pair(rng, config: TaskConfig, a: int, b: int) -> tuple[str, str] | None:
    """Two candidate answers as (chosen, rejected) by the gold scorer, or None on a tie."""
    prompt = f"{a}+{b}="
    first, second = (_candidate(rng, config, a, b, config.preference_noise_rate) for _ in range(2))
    first_score, second_score = (
        gold_reward(prompt, text, kind=config.preference_reward, require_eos=False)
        for text in (first, second)
    )
    if first_score == second_score:
        return None
    return (first, second) if first_score > second_score else (second, first)


def _preference_rows(rng, config: TaskConfig, count: int, *, exclude: frozenset) -> list[dict]:
    """`count` training pairs; a problem whose candidates tie is discarded."""
    rows = []
    while len(rows) < count:
        ((a, b),) = _draw_problems(rng, config, 1, exclude=exclude)
        pair = _ordered_pair(rng, config, a, b)
        if pair is not None:
            rows.append(_row(config, a, b, chosen=pair[0], rejected=pair[1]))
    return rows


def _held_out_preference_rows(rng, config: TaskConfig, problems) -> list[dict]:
    """One pair per held-out problem; tied candidates are redrawn for the same problem."""
    rows = []
    for a, b in problems:
        pair = None
        while pair is None:
            pair = _ordered_pair(rng, config, a, b)
        rows.append(_row(config, a, b, chosen=pair[0], rejected=pair[1]))
    return rows


def _row(config: TaskConfig, a: int, b: int, **responses: str) -> dict:
    """One data row in the configured format; `answer` stays a plain string field."""
    prompt = f"{a}+{b}="
    if config.format == "string":
        return {"prompt": prompt, **responses}
    user = [{"role": "user", "content": prompt}]
    if "completion" in responses:
        return {"messages": user + [{"role": "assistant", "content": responses["completion"]}]}
    row = {"prompt": user}
    for name, text in responses.items():
        row[name] = text if name == "answer" else [{"role": "assistant", "content": text}]
    return row


def build_task(output_dir: str | Path, config: TaskConfig | None = None) -> TaskFiles:
    """Generate the task into `output_dir` (see the module docstring for the layout).

    Returns the written paths. Running it twice with the same config writes identical files.
    """
    config = config if config is not None else TaskConfig()
    splits = make_splits(config)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(output_dir / "tokenizer", TASK_ALPHABET)
    for name, rows in splits.items():
        write_jsonl(output_dir / f"{name}.jsonl", rows)
    return TaskFiles(
        tokenizer_dir=output_dir / "tokenizer",
        config=write_config(output_dir / "task_config.json", config),
        **{name: output_dir / f"{name}.jsonl" for name in splits},
    )


def correct(prompts, completions, answer=None, **kwargs) -> list[float]:
    """TRL-style reward function: 1.0 when the completion (decoded without special tokens) is
    the sum, from the row's `answer` when it has one, else from the prompt's operands."""
    answers = answer if answer is not None else [None] * len(prompts)
    return [gold_reward(_prompt_text(prompt), _completion_text(completion), require_eos=False, answer=gold)
            for prompt, completion, gold in zip(prompts, completions, answers)]


def _prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else " ".join(str(m.get("content", "")) for m in prompt)


def _completion_text(completion) -> str:
    return completion if isinstance(completion, str) else str(completion[-1].get("content", ""))


class ArithmeticTask(Task):
    """Multi-digit addition (the module docstring)."""

    name = "arithmetic"
    config_class = TaskConfig

    def build(self, output_dir, config=None) -> TaskFiles:
        return build_task(output_dir, config)

    def reward(self, prompt, completion, answer=None, *, kind="exact", eos_token=EOS_TOKEN) -> float:
        return gold_reward(prompt, completion, kind=kind, eos_token=eos_token, answer=answer)

    def reward_functions(self):
        return {"correct": correct}

    def describe(self, config: TaskConfig) -> str:
        return (f"Task: addition of {config.min_digits}-{config.max_digits} digit numbers, {config.num_sft} SFT "
                f"demonstrations ({config.sft_noise_rate:.0%} corrupted: {', '.join(config.corruptions)}), "
                f"{config.num_preferences} preference pairs, {config.num_prompts} RL prompts, "
                f"{config.num_eval_prompts} held-out prompts.")


TASK = ArithmeticTask()
