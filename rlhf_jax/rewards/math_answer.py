"""Math answer verification with the `math-verify` package (symbolic equivalence).

The completion's answer is the content of its last `\\boxed{...}` (or `<answer>` tag), else
its last number (integer, decimal or `a/b`, or a `\\frac{a}{b}`); the reference is the row's
`answer` column. Both are parsed by `math_verify.parse` and compared with
`math_verify.verify`, so `1/2`, `0.5` and `\\frac{1}{2}` agree. math-verify bounds its own time
with `signal.alarm`, which works only on the main thread; elsewhere its timeouts are off.
"""
from __future__ import annotations

import re
import threading

from rlhf_jax.rewards.text import _ANSWER_TAG, completion_text, last_boxed

_NUMBER = re.compile(r"\\frac\{-?\d+\}\{-?\d+\}|-?\d+(?:,\d{3})*(?:\.\d+)?(?:\s*/\s*\d+)?")


def extract_answer(text: str) -> str | None:
    """The last `\\boxed{}` content, else the last `<answer>` tag's, else the last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def _timeout() -> int | None:
    return 5 if threading.current_thread() is threading.main_thread() else None


def answers_agree(prediction: str, reference: str) -> bool:
    """Whether the two answer texts are mathematically equal (per math-verify)."""
    from math_verify import parse, verify

    timeout = _timeout()
    gold = parse(f"${reference}$", parsing_timeout=timeout)
    if not gold:
        gold = parse(str(reference), parsing_timeout=timeout)
    guess = parse(f"${prediction}$", parsing_timeout=timeout)
    if not gold or not guess:
        return prediction.strip() == str(reference).strip()
    return bool(verify(gold, guess, timeout_seconds=timeout))


def math_answer(completions, answer, **kwargs) -> list[float | None]:
    """1.0 when the completion's final answer (`extract_answer`) equals the row's `answer`
    symbolically, 0.0 otherwise (also without any answer); None for rows without an answer."""
    rewards = []
    for completion, reference in zip(completions, answer):
        if reference is None:
            rewards.append(None)
            continue
        predicted = extract_answer(completion_text(completion))
        rewards.append(0.0 if predicted is None else float(answers_agree(predicted, str(reference))))
    return rewards


__all__ = ["extract_answer", "answers_agree", "math_answer"]
