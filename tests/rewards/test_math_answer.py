"""Math answer verification (math-verify) against a table of equal and unequal answers."""
import threading

import pytest

from rlhf_jax.rewards import answers_agree, extract_answer, math_answer

# (completion, reference answer, should agree)
TABLE = [
    ("\\boxed{\\frac{1}{2}}", "1/2", True),
    ("The answer is 0.5", "1/2", True),
    ("so we get $\\frac{1}{2}$, i.e. \\boxed{0.5}", "\\frac{1}{2}", True),
    ("1/2", "0.5", True),
    ("\\boxed{2}", "2", True),
    ("\\boxed{2.0}", "2", True),
    ("We find x = 7. Final answer: 7", "7", True),
    ("\\boxed{-3}", "-3", True),
    ("\\boxed{\\sqrt{4}}", "2", True),
    ("\\boxed{\\frac{6}{4}}", "3/2", True),
    ("\\boxed{1.5}", "\\frac{3}{2}", True),
    ("\\boxed{\\pi}", "\\pi", True),
    ("\\boxed{2\\pi}", "2\\pi", True),
    ("\\boxed{x+1}", "1+x", True),
    ("\\boxed{25\\%}", "25\\%", True),
    ("first 3, then 4, finally 12", "12", True),
    ("\\boxed{1,000}", "1000", True),
    ("<answer>42</answer>", "42", True),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", True),
    ("\\boxed{10^{3}}", "1000", True),
    ("\\boxed{3}", "4", False),
    ("The answer is 0.49", "1/2", False),
    ("\\boxed{\\frac{1}{3}}", "0.5", False),
    ("\\boxed{-2}", "2", False),
    ("first 12, then 3", "12", False),
    ("no number here", "5", False),
    ("\\boxed{x+2}", "x+1", False),
    ("\\boxed{\\pi}", "3", False),
    ("\\boxed{2\\sqrt{2}}", "2", False),
    ("\\boxed{100}", "1000", False),
    ("\\boxed{7} but then \\boxed{8}", "7", False),
    ("<answer>41</answer>", "42", False),
]


def test_table_has_thirty_pairs_of_both_kinds():
    assert len(TABLE) >= 30
    assert sum(agree for *_, agree in TABLE) >= 10 and sum(not agree for *_, agree in TABLE) >= 10


@pytest.mark.parametrize("completion, reference, agree", TABLE)
def test_math_answer_table(completion, reference, agree):
    assert math_answer([completion], [reference]) == [float(agree)]


def test_extraction_prefers_the_last_box_then_the_last_number():
    assert extract_answer("a \\boxed{1} b \\boxed{\\frac{2}{3}} c 9") == "\\frac{2}{3}"
    assert extract_answer("values 1, 2 and 3.5") == "3.5"
    assert extract_answer("nothing") is None


def test_rows_without_answer_do_not_apply_and_messages_are_read():
    completions = ["\\boxed{1}", [{"role": "assistant", "content": "it is \\boxed{2}"}]]
    assert math_answer(completions, [None, "2"]) == [None, 1.0]


def test_runs_off_the_main_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append(answers_agree("0.5", "\\frac{1}{2}")))
    thread.start()
    thread.join()
    assert results == [True]
