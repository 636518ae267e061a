"""Text helpers shared by the built-in rewards, and the exact-match and format rewards."""
from __future__ import annotations

import re
import string
import unicodedata


def completion_text(completion) -> str:
    """The text of a completion: a string, or the content of a conversational completion's
    last message (`[{"role": "assistant", "content": ...}]`)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def normalize_answer(text: str) -> str:
    """Lower case, NFKC, the `<answer>` tag's content if there is one, `\\boxed{}` unwrapped,
    punctuation at the ends and articles removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", str(text))
    tags = _ANSWER_TAG.findall(text)
    if tags:
        text = tags[-1]
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed
    text = text.lower().strip().strip(string.punctuation + " ")
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced;
    None when there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    opening = text.index("{", start)
    depth = 0
    for position in range(opening, len(text)):
        depth += {"{": 1, "}": -1}.get(text[position], 0)
        if depth == 0:
            return text[opening + 1: position]
    return None


def exact_match(completions, answer, **kwargs) -> list[float | None]:
    """1.0 when the completion equals the row's `answer` after `normalize_answer`, else 0.0;
    None for rows without an answer."""
    return [None if gold is None else float(normalize_answer(completion_text(c)) == normalize_answer(gold))
            for c, gold in zip(completions, answer)]


THINK_FORMAT = r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$"


def regex_format(pattern: str, *, name: str = "regex_format"):
    """A reward function: 1.0 when the whole completion matches `pattern` (`re.DOTALL`), else 0.0."""
    compiled = re.compile(pattern, re.DOTALL)

    def reward(completions, **kwargs) -> list[float]:
        return [float(compiled.fullmatch(completion_text(c)) is not None) for c in completions]

    reward.__name__ = name
    return reward


think_format = regex_format(THINK_FORMAT, name="think_format")
think_format.__doc__ = ("1.0 for completions shaped `<think>...</think><answer>...</answer>` "
                        "(whitespace around them allowed), else 0.0.")

__all__ = ["completion_text", "normalize_answer", "last_boxed", "exact_match", "regex_format",
           "think_format", "THINK_FORMAT"]
