"""Countdown: reach a target number from given numbers with + - * / (each number used once).

A prompt lists the numbers and the target, `"3 5 7>22:"`; a right completion is an expression
that uses every given number exactly once and evaluates to the target, e.g. `"3*5+7"`, then
the EOS token. Any such expression is right, not only the reference one. Problems are drawn
from `TaskConfig.seed`: `num_numbers` numbers in 1..`max_number`, combined by a random
expression tree with + - * (and / where it divides exactly); the target is its value, kept
when it is a whole number in 1..`max_target`. Files (the layout of `rlhf_jax.pipeline.tasks`):

    tokenizer/            character-level tokenizer over "0123456789+-*/()>: "
    sft.jsonl             {"prompt", "completion"}: the reference expression, a share
                          `sft_noise_rate` of them corrupted (SFT imitates the mistakes,
                          reinforcement learning has something to fix)
    preferences.jsonl     {"prompt", "chosen", "rejected"}: two candidates ordered by the reward
    prompts.jsonl         {"prompt", "answer"}: RL prompts with a reference expression
    eval_prompts.jsonl    {"prompt", "answer"}: held-out problems
    eval_preferences.jsonl

Corruptions: `op` (one operator replaced), `number` (one number replaced by another value, so
the numbers no longer match), `drop` (the last number and its operator left out).

The reward (`countdown_reward`, the task's scorer; `correct` as a TRL-style function) reads the
completion up to EOS: exact = 1.0 when it is an expression of + - * / and parentheses over
exactly the given numbers (as a multiset) whose value equals the target, else 0.0. Graded
adds partial credit: 0.1 for a well-formed expression that misses, -1.0 without EOS.
"""
from __future__ import annotations

import ast
import dataclasses
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np

from rlhf_jax.pipeline.tasks import Task, TaskFiles, write_config, write_jsonl
from rlhf_jax.pipeline.tokenizer import EOS_TOKEN, build_tokenizer

COUNTDOWN_ALPHABET = "0123456789+-*/()>: "
CORRUPTIONS = ("op", "number", "drop")
_PROMPT = re.compile(r"((?:\d+ )*\d+)>(\d+):")
_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


@dataclass
class TaskConfig:
    """How Countdown problems are generated (the `task:` section, with `name: countdown`)."""

    seed: int = 0
    num_numbers: int = 3  # numbers per problem
    max_number: int = 9  # numbers are drawn from 1..max_number
    max_target: int = 100  # targets are whole numbers in 1..max_target
    division: bool = False  # also draw exact divisions
    num_sft: int = 8000
    num_preferences: int = 2000
    num_prompts: int = 2048
    num_eval_prompts: int = 256
    num_eval_preferences: int = 128
    sft_noise_rate: float = 0.4  # share of demonstrations with a corrupted expression
    preference_noise_rate: float = 0.5
    corruptions: tuple[str, ...] = CORRUPTIONS
    format: Literal["string", "conversational"] = "string"


def parse_prompt(prompt: str) -> tuple[list[int], int]:
    """`(numbers, target)` of the last `"a b c>t:"` in `prompt` (plain or chat-rendered)."""
    matches = _PROMPT.findall(prompt)
    if not matches:
        raise ValueError(f"prompt {prompt!r} holds no countdown problem like '3 5 7>22:'")
    numbers, target = matches[-1]
    return [int(n) for n in numbers.split()], int(target)


def evaluate_expression(text: str) -> tuple[Fraction, list[int]] | None:
    """`(value, numbers used)` of an arithmetic expression of integers, + - * / and
    parentheses (exact fractions), or None when it is anything else or divides by zero."""
    if not text or not set(text) <= set(COUNTDOWN_ALPHABET[:16] + " "):
        return None
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        return None
    numbers: list[int] = []

    def value(node) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            numbers.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = value(node.left), value(node.right)
            op = _OPS[type(node.op)]
            if op == "/" and right == 0:
                raise ZeroDivisionError
            return {"+": left + right, "-": left - right, "*": left * right,
                    "/": left / right if op == "/" else None}[op]
        raise ValueError("not an expression of numbers and + - * /")

    try:
        return value(tree), numbers
    except (ValueError, ZeroDivisionError):
        return None


def countdown_reward(prompt: str, completion: str, *, kind: str = "exact", eos_token: str = EOS_TOKEN,
                     require_eos: bool = True, no_eos_score: float = -1.0) -> float:
    """The verifiable reward of `completion` for the problem in `prompt` (module docstring)."""
    if kind not in ("exact", "graded"):
        raise ValueError(f"kind must be 'exact' or 'graded', got {kind!r}")
    numbers, target = parse_prompt(prompt)
    stop = completion.find(eos_token)
    if stop < 0 and require_eos:
        return 0.0 if kind == "exact" else float(no_eos_score)
    result = evaluate_expression(completion if stop < 0 else completion[:stop])
    if result is None:
        return 0.0
    value, used = result
    if sorted(used) == sorted(numbers) and value == target:
        return 1.0
    return 0.0 if kind == "exact" else 0.1


def correct(prompts, completions, **kwargs) -> list[float]:
    """TRL-style reward function: 1.0 for a completion (decoded without special tokens) that
    reaches the prompt's target with each given number once, else 0.0."""
    texts = [p if isinstance(p, str) else " ".join(str(m.get("content", "")) for m in p) for p in prompts]
    outs = [c if isinstance(c, str) else str(c[-1].get("content", "")) for c in completions]
    return [countdown_reward(p, c, require_eos=False) for p, c in zip(texts, outs)]


# ----------------------------------------------------------------------------- generation


def _render(node) -> tuple[str, int]:
    """Text and precedence (1: + -, 2: * /, 3: number) of an expression tree node."""
    if isinstance(node, int):
        return str(node), 3
    op, left, right = node
    level = 1 if op in "+-" else 2
    left_text, left_level = _render(left)
    right_text, right_level = _render(right)
    if left_level < level:
        left_text = f"({left_text})"
    if right_level < level or (right_level == level and op in "-/"):
        right_text = f"({right_text})"
    return f"{left_text}{op}{right_text}", level


def _draw_problem(rng: np.random.Generator, config: TaskConfig) -> tuple[tuple[int, ...], int, str]:
    """`(numbers as given, target, reference expression)`."""
    ops = "+-*/" if config.division else "+-*"
    while True:
        numbers = [int(n) for n in rng.integers(1, config.max_number + 1, config.num_numbers)]
        nodes: list = list(numbers)
        while len(nodes) > 1:  # join two random neighbours (keeps the given order readable)
            at = int(rng.integers(len(nodes) - 1))
            nodes[at: at + 2] = [(str(rng.choice(list(ops))), nodes[at], nodes[at + 1])]
        text = _render(nodes[0])[0]
        result = evaluate_expression(text)
        if result is not None and result[0].denominator == 1 and 1 <= result[0] <= config.max_target:
            return tuple(numbers), int(result[0]), text


def corrupt_expression(rng: np.random.Generator, numbers, text: str, kind: str) -> str:
    """A wrong expression made from the reference `text` by corruption `kind` (module
    docstring); it never scores 1."""
    if kind == "op":
        positions = [i for i, ch in enumerate(text) if ch in "+-*/" and i > 0 and text[i - 1] not in "(+-*/"]
        at = int(rng.choice(positions))
        wrong = text[:at] + str(rng.choice([op for op in "+-*" if op != text[at]])) + text[at + 1:]
    elif kind == "number":
        spans = [m.span() for m in re.finditer(r"\d+", text)]
        start, end = spans[int(rng.integers(len(spans)))]
        old = int(text[start:end])
        wrong = text[:start] + str(old % 9 + 1 if old < 10 else old + 1) + text[end:]
    elif kind == "drop":
        wrong = re.sub(r"[+\-*/]\(?\d+\)*$", "", text) or text[:-1]
        wrong = wrong if wrong.count("(") == wrong.count(")") else wrong.replace("(", "").replace(")", "")
    else:
        raise ValueError(f"corruption kind must be one of {CORRUPTIONS}, got {kind!r}")
    target = _render_target(numbers, text)
    if wrong == text or countdown_reward(_prompt(numbers, target), wrong, require_eos=False) == 1.0:
        return wrong + "+1" if kind != "op" else corrupt_expression(rng, numbers, text, "drop")
    return wrong


def _render_target(numbers, text) -> int:
    return int(evaluate_expression(text)[0])


def _prompt(numbers, target) -> str:
    return f"{' '.join(map(str, numbers))}>{target}:"


def _row(config: TaskConfig, numbers, target, **responses: str) -> dict:
    prompt = _prompt(numbers, target)
    if config.format == "string":
        return {"prompt": prompt, **responses}
    user = [{"role": "user", "content": prompt}]
    if "completion" in responses:
        return {"messages": user + [{"role": "assistant", "content": responses["completion"]}]}
    return {"prompt": user, **{name: text if name == "answer" else [{"role": "assistant", "content": text}]
                               for name, text in responses.items()}}


def validate_task_config(config: TaskConfig) -> None:
    """Raise ValueError naming the first field out of range."""
    if not 2 <= config.num_numbers <= 6:
        raise ValueError(f"num_numbers must be in 2..6, got {config.num_numbers}")
    if not 2 <= config.max_number <= 99 or config.max_target < 1:
        raise ValueError(f"need 2 <= max_number <= 99 and max_target >= 1, got {config.max_number}, "
                         f"{config.max_target}")
    if not 0.0 <= config.sft_noise_rate <= 1.0 or not 0.0 < config.preference_noise_rate < 1.0:
        raise ValueError("sft_noise_rate must be in [0, 1] and preference_noise_rate in (0, 1)")
    unknown = [kind for kind in config.corruptions if kind not in CORRUPTIONS]
    if unknown or not config.corruptions:
        raise ValueError(f"corruptions must be a non-empty subset of {CORRUPTIONS}, got {config.corruptions}")
    for name in ("num_sft", "num_preferences", "num_prompts", "num_eval_prompts", "num_eval_preferences"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(config, name)}")


def make_splits(config: TaskConfig) -> dict[str, list[dict]]:
    """The task's rows by split (deterministic in `config.seed`; held-out problems, keyed by
    their numbers and target, never appear in a training split)."""
    validate_task_config(config)
    stream = lambda index: np.random.default_rng(np.random.SeedSequence([config.seed, index]))

    def draw(rng, count, exclude=frozenset(), unique=False):
        problems, seen, tries = [], set(), 0
        while len(problems) < count:
            tries += 1
            if tries > 200 * (count + 10):
                raise ValueError(f"cannot draw {count} distinct problems with these settings")
            numbers, target, text = _draw_problem(rng, config)
            key = (tuple(sorted(numbers)), target)
            if key in exclude or (unique and key in seen):
                continue
            seen.add(key)
            problems.append((numbers, target, text))
        return problems

    key = lambda problem: (tuple(sorted(problem[0])), problem[1])
    eval_problems = draw(stream(0), config.num_eval_prompts, unique=True)
    eval_pairs = draw(stream(1), config.num_eval_preferences, exclude=frozenset(map(key, eval_problems)),
                      unique=True)
    held_out = frozenset(map(key, eval_problems)) | frozenset(map(key, eval_pairs))

    def candidate(rng, numbers, text, noise):
        if rng.random() < noise:
            return corrupt_expression(rng, numbers, text, str(rng.choice(list(config.corruptions))))
        return text

    def pair(rng, numbers, target, text):
        prompt = _prompt(numbers, target)
        first, second = (candidate(rng, numbers, text, config.preference_noise_rate) for _ in range(2))
        scores = [countdown_reward(prompt, c, require_eos=False, kind="graded") for c in (first, second)]
        if scores[0] == scores[1]:
            return None
        return (first, second) if scores[0] > scores[1] else (second, first)

    sft_rng = stream(2)
    sft = [_row(config, n, t, completion=candidate(sft_rng, n, text, config.sft_noise_rate))
           for n, t, text in draw(sft_rng, config.num_sft, exclude=held_out)]
    prompts = [_row(config, n, t, answer=text) for n, t, text in draw(stream(3), config.num_prompts, exclude=held_out)]
    preferences, rng = [], stream(4)
    while len(preferences) < config.num_preferences:
        (n, t, text), = draw(rng, 1, exclude=held_out)
        chosen_rejected = pair(rng, n, t, text)
        if chosen_rejected:
            preferences.append(_row(config, n, t, chosen=chosen_rejected[0], rejected=chosen_rejected[1]))
    eval_preferences, rng = [], stream(5)
    for n, t, text in eval_pairs:
        chosen_rejected = None
        while chosen_rejected is None:
            chosen_rejected = pair(rng, n, t, text)
        eval_preferences.append(_row(config, n, t, chosen=chosen_rejected[0], rejected=chosen_rejected[1]))
    return {"sft": sft, "preferences": preferences, "prompts": prompts,
            "eval_prompts": [_row(config, n, t, answer=text) for n, t, text in eval_problems],
            "eval_preferences": eval_preferences}


def build_task(output_dir: str | Path, config: TaskConfig | None = None) -> TaskFiles:
    """Generate the task into `output_dir`; the same config writes identical files."""
    config = config if config is not None else TaskConfig()
    splits = make_splits(config)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(output_dir / "tokenizer", COUNTDOWN_ALPHABET)
    for name, rows in splits.items():
        write_jsonl(output_dir / f"{name}.jsonl", rows)
    return TaskFiles(tokenizer_dir=output_dir / "tokenizer", config=write_config(output_dir / "task_config.json", config),
                     **{name: output_dir / f"{name}.jsonl" for name in splits})


class CountdownTask(Task):
    """The Countdown numbers game (module docstring)."""

    name = "countdown"
    config_class = TaskConfig

    def build(self, output_dir, config=None) -> TaskFiles:
        return build_task(output_dir, config)

    def reward(self, prompt, completion, answer=None, *, kind="exact", eos_token=EOS_TOKEN) -> float:
        del answer  # any expression reaching the target counts, not only the reference one
        return countdown_reward(prompt, completion, kind=kind, eos_token=eos_token)

    def reward_functions(self):
        return {"correct": correct}

    def describe(self, config: TaskConfig) -> str:
        return (f"Task: Countdown with {config.num_numbers} numbers in 1..{config.max_number} and targets up to "
                f"{config.max_target}, {config.num_sft} SFT demonstrations ({config.sft_noise_rate:.0%} corrupted: "
                f"{', '.join(config.corruptions)}), {config.num_prompts} RL prompts, "
                f"{config.num_eval_prompts} held-out prompts.")


TASK = CountdownTask()

__all__ = ["TaskConfig", "CORRUPTIONS", "parse_prompt", "evaluate_expression", "countdown_reward", "correct",
           "corrupt_expression", "make_splits", "build_task", "CountdownTask", "TASK"]
