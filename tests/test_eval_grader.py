"""Tests for crisp_fast.eval.grader: hand-written responses with known verdicts on both paths
(last `Answer:` line, last `\\boxed{}`), math equivalences, malformed / empty / truncated
outputs, and the bounded check from non-main threads. Budget: ~15 s.

    PYTHONPATH=. pytest tests/test_eval_grader.py -q
"""
import random
import threading

import pytest

from crisp_fast.eval import grader
from crisp_fast.eval.grader import (
    extract_answer_line,
    extract_boxed_answers,
    extract_last_boxed,
    grade_response,
    is_equivalent,
)

# (response, reference, expected correct, expected boxed answer, expected answer line)
CASES = [
    # the two paths, each alone
    ("so the result is \\boxed{42}.", "42", True, "42", None),
    ("Working...\nAnswer: 42", "42", True, None, "42"),
    ("**Answer:** $42$", "42", True, None, "42"),
    ("Final answer: 7.", "7", True, None, "7"),
    # either path suffices: a wrong box with a right answer line, and the reverse
    ("\\boxed{41}\nAnswer: 42", "42", True, "41", "42"),
    ("\\boxed{42}\nAnswer: 41", "42", True, "42", "41"),
    ("\\boxed{41}\nAnswer: 40", "42", False, "41", "40"),
    # equivalences
    ("\\boxed{0.5}", "\\frac{1}{2}", True, "0.5", None),
    ("\\boxed{\\dfrac{1}{2}}", "0.5", True, "\\dfrac{1}{2}", None),
    ("Answer: 1/2", "\\tfrac12", True, None, "1/2"),
    ("\\boxed{\\frac{\\sqrt{3}}{3}}", "1/sqrt(3)", True, "\\frac{\\sqrt{3}}{3}", None),
    ("\\boxed{x^2 - x}", "x(x-1)", True, "x^2 - x", None),
    ("\\boxed{2-2x}", "-2x+2", True, "2-2x", None),
    # units and degrees
    ("\\boxed{10\\text{ cm}}", "10", True, "10\\text{ cm}", None),
    ("\\boxed{90^\\circ}", "90", True, "90^\\circ", None),
    ("Answer: 15 meters", "15", True, None, "15 meters"),
    # nested braces, escaped braces
    ("\\boxed{\\frac{1}{\\frac{2}{3}}}", "3/2", True, "\\frac{1}{\\frac{2}{3}}", None),
    ("\\boxed{\\{1, 2, 3\\}}", "\\{1,2,3\\}", True, "\\{1, 2, 3\\}", None),
    ("\\boxed{\\left(2, \\frac{1}{2}\\right)}", "(2, 1/2)", True, "\\left(2, \\frac{1}{2}\\right)", None),
    # several boxes: the last counts, not the first or any
    ("first \\boxed{5} then corrected to \\boxed{6}", "5", False, "6", None),
    ("first \\boxed{5} then corrected to \\boxed{6}", "6", True, "6", None),
    ("\\fbox{8}", "8", True, "8", None),
    ("\\boxed 9.", "9", True, "9", None),
    # wrong answers
    ("\\boxed{0.51}", "\\frac{1}{2}", False, "0.51", None),
    ("Answer: 43", "42", False, None, "43"),
    # plain-word references compare as text (math-verify would read "No" as n*o and accept "on")
    ("Answer: No", "No", True, None, "No"),
    ("Answer: on", "No", False, None, "on"),
    ("Answer: Infinitely many solutions.", "Infinitely many solutions", True, None, "Infinitely many solutions"),
    # malformed, empty, truncated
    ("", "3", False, None, None),
    (None, "3", False, None, None),
    ("   \n\n  ", "3", False, None, None),
    ("\\boxed{}", "3", False, None, None),
    ("Answer:", "3", False, None, None),
    ("the answer is \\boxed{12", "12", False, None, None),
    ("<think>long reasoning ... so maybe \\boxed{3} but let me check \\frac{1}{", "3", True, "3", None),
    ("\\boxed{\\frac{1}{2}", "1/2", False, None, None),
    ("}}}{{{ \\boxed{{{", "1", False, None, None),
    ("Answer: \\boxed{\\frac{3}{4}}", "0.75", True, "\\frac{3}{4}", "\\frac{3}{4}"),
]


@pytest.mark.parametrize("response,reference,correct,boxed,answer_line", CASES)
def test_known_verdicts(response, reference, correct, boxed, answer_line):
    result = grade_response(response, reference)
    assert result.boxed_answer == boxed
    assert result.answer_line == answer_line
    assert result.correct is correct
    assert result.correct == (result.boxed_correct or result.answer_line_correct)


def test_list_of_references_accepts_any_alternative():
    assert grade_response("Answer: 252", ["C(10, 5)", "252"]).correct
    assert grade_response("\\boxed{\\binom{10}{5}}", ["C(10, 5)", "252"]).correct
    assert not grade_response("Answer: 251", ["C(10, 5)", "252"]).correct


def test_numeric_reference_and_bad_reference_types():
    assert is_equivalent("17", 17)
    with pytest.raises(TypeError, match="reference"):
        is_equivalent("17", {"answer": 17})
    with pytest.raises(TypeError, match="alternatives"):
        is_equivalent("17", [17, None])


def test_random_fractions_against_decimals(seed):
    """Fresh random a/b each run: the LaTeX fraction, the plain fraction and the decimal agree;
    a neighbouring value does not."""
    rng = random.Random(seed)
    for _ in range(5):
        numerator, denominator = rng.randint(1, 99), rng.choice([2, 4, 5, 8, 10, 20, 25])
        decimal = f"{numerator / denominator:.6g}"
        assert grade_response(f"\\boxed{{\\frac{{{numerator}}}{{{denominator}}}}}", decimal).correct
        assert grade_response(f"Answer: {numerator}/{denominator}", decimal).correct
        wrong = f"{numerator / denominator + 0.01:.6g}"
        assert not grade_response(f"\\boxed{{\\dfrac{{{numerator}}}{{{denominator}}}}}", wrong).correct


def test_boxed_extraction_nesting_depth(seed):
    """A box whose content nests braces to a random depth comes back whole."""
    rng = random.Random(seed)
    depth = rng.randint(1, 12)
    inner = "x"
    for _ in range(depth):
        inner = "{" + inner + "}"
    text = f"noise {{ \\boxed{{a{inner}b}} more"
    assert extract_boxed_answers(text) == [f"a{inner}b"]
    assert extract_last_boxed(text[: text.index("b}")]) is None  # cut before the closing braces


def test_answer_line_takes_last_nonempty_line():
    text = "Answer: 1\nmore thinking\nAnswer: 2\nAnswer:\n"
    assert extract_answer_line(text) == "2"
    assert extract_answer_line("no such line") is None
    assert extract_answer_line("The Answer is 5") is None  # needs the colon


def test_overlong_answer_is_never_equivalent():
    long_answer = "1+" * grader.MAX_ANSWER_CHARS + "1"
    assert not is_equivalent(long_answer, "1")


def test_grading_from_a_thread_matches_main_thread():
    """math-verify's signal timeouts do not work off the main thread: there the check runs in a
    worker process. Verdicts must be the same."""
    cases = [("\\boxed{0.5}", "1/2"), ("Answer: 43", "42"), ("\\boxed{90^\\circ}", "90")]
    in_main = [grade_response(r, a).correct for r, a in cases]
    in_thread = []
    worker = threading.Thread(target=lambda: in_thread.extend(grade_response(r, a).correct for r, a in cases))
    worker.start()
    worker.join(timeout=120)
    assert in_thread == in_main == [True, False, True]


def test_overrunning_worker_is_killed_and_counts_as_wrong(monkeypatch):
    """A check that overruns its bound is abandoned (not equivalent), its worker killed, and the
    next check gets a fresh worker."""
    monkeypatch.setattr(grader, "_worker_deadline_s", lambda timeout_s, n: 0.05)
    verdicts = []
    # sympy spends seconds on this tower (until math-verify's own 1 s timeout in the worker)
    slow = threading.Thread(target=lambda: verdicts.append(is_equivalent("2^{2^{2^{2^{2^{2}}}}}", "1", 1)))
    slow.start()
    slow.join(timeout=60)
    assert verdicts == [False]
    assert slow.ident not in grader._workers  # killed and forgotten
    monkeypatch.undo()
    worker = threading.Thread(target=lambda: verdicts.append(is_equivalent("0.5", "1/2")))
    worker.start()
    worker.join(timeout=120)
    assert verdicts == [False, True]


def test_slow_sympy_is_bounded_in_main_thread():
    """A tower of powers makes sympy hang; math-verify's timeout stops it and it is not correct."""
    import time

    start = time.monotonic()
    assert not is_equivalent("2^{2^{2^{2^{2^{2}}}}}", "1", timeout_s=1)
    assert time.monotonic() - start < 30


def test_prose_or_plain_text_reference_does_not_match_a_fragment():
    """math-verify alone reads "2^(n-1)" as 2 and "x=6, y=5" as 5; only whole parses count here."""
    assert not grade_response("Answer: 2", "2^(n-1)").correct
    assert grade_response("Answer: 2^{n-1}", "2^(n-1)").correct
    assert not grade_response("Answer: 5", "x=6, y=5").correct
    assert grade_response("\\boxed{x=6, y=5}", "x=6, y=5").correct


def test_champ_references_grade_themselves_and_reject_a_wrong_number(seed):
    """A random handful of CHAMP problems: each reference, written as either answer form, is
    correct against its own problem; an unrelated number is not."""
    from crisp_fast.eval.problems import load_champ

    problems = random.Random(seed).sample(load_champ(), 12)
    for problem in problems:
        assert grade_response(f"Answer: {problem.answers[0]}", problem.answers).correct, problem.answers
        assert grade_response(f"\\boxed{{{problem.answers[-1]}}}", problem.answers).correct, problem.answers
        assert not grade_response("Answer: 987654321", problem.answers).correct, problem.answers


def test_degenerate_long_responses_grade_quickly(seed):
    """Looping outputs (100k+ characters of unclosed boxes, dollar signs, answer lines) must not
    make extraction quadratic: each grades in well under a few seconds."""
    import time

    rng = random.Random(seed)
    value = rng.randint(1, 999)
    responses = [
        "\\boxed{" * 40_000 + "x",
        "\\boxed " * 40_000 + str(value),
        "Answer: " + "$" * 200_000,
        ("Answer: wait\n" * 20_000) + f"\\boxed{{{value}}}",
    ]
    for response in responses:
        start = time.monotonic()
        result = grade_response(response, str(value))
        assert time.monotonic() - start < 5, response[:20]
        assert result.correct is (response.endswith(f"{{{value}}}") or response.endswith(f" {value}"))


def test_grade_many_in_parallel_workers_matches_sequential(seed):
    rng = random.Random(seed)
    items = []
    for _ in range(10):
        value = rng.randint(-20, 20)
        items.append((rng.choice([f"\\boxed{{{value}}}", f"Answer: {value + 1}", f"\\boxed{{\\frac{{{2 * value}}}{{2}}}}",
                                  ""]), str(value)))
    sequential = [grade_response(r, a) for r, a in items]
    parallel = grader.grade_many(items, workers=3)
    assert parallel == sequential
    assert not grader._workers  # the pool's worker processes are stopped afterwards
