"""The paper's dual-path math grader, standalone (no model, no torch).

A response is correct when EITHER its last `Answer:` line OR its last `\\boxed{...}` answer is
mathematically equivalent to the reference, as judged by `math-verify`:

    from crisp_fast.eval.grader import grade_response
    result = grade_response("... so \\boxed{\\dfrac{1}{2}}", "0.5")
    result.correct, result.boxed_answer, result.answer_line

Extraction is our own string code (balanced braces, escaped braces, the last box wins, a box cut
off by truncation is no answer); equivalence is math-verify's. math-verify bounds its time with
`signal.alarm`, which only works in the main thread; from any other thread the check runs in a
child process (whose main thread may use signals) and is abandoned, and the child killed,
when it overruns: a hung sympy call never hangs the caller and never counts as correct.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache

# Answers longer than this are not math a reference can match; parsing them only risks a hang.
MAX_ANSWER_CHARS = 2000
DEFAULT_TIMEOUT_S = 5

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_BOX_PATTERN = re.compile("|".join(re.escape(command) for command in _BOX_COMMANDS) + r"(?![A-Za-z])")
_BOX_TOKEN = re.compile(r"[^\s$.,;{}]+")
# "Answer: x", "**Answer:** x", "Final answer: x", "- ANSWER: x" (markdown decorations allowed)
_ANSWER_LINE = re.compile(
    r"^[\s>#*_\-]*(?:final\s+)?answer\s*(?:\*\*|__)?\s*[:：]\s*(?:\*\*|__)?\s*(?P<content>.*?)\s*$",
    re.IGNORECASE,
)
# a reference made of plain words ("No", "Infinitely many solutions") is compared as text:
# math-verify would read "No" as the product n*o and accept "on"
_PLAIN_WORDS = re.compile(r"^[A-Za-z]{2,}(?:[ \-'][A-Za-z]+)*\.?$")


@dataclass
class GradeResult:
    """The verdict on one response and the answers it was based on (None: none found)."""

    correct: bool
    boxed_answer: str | None
    answer_line: str | None
    boxed_correct: bool
    answer_line_correct: bool

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------- extraction

def _matching_braces(text: str) -> dict[int, int]:
    """{index of each `{`: index of its closing `}`} for every group that closes, in one pass
    (a degenerate looping response of 100k characters full of unclosed boxes stays linear).
    `\\{` and `\\}` are literal braces in LaTeX and do not open or close a group."""
    matches: dict[int, int] = {}
    open_stack: list[int] = []
    index = 0
    length = len(text)
    while index < length:
        char = text[index]
        if char == "\\":
            index += 2  # skip the escaped character, whatever it is
            continue
        if char == "{":
            open_stack.append(index)
        elif char == "}" and open_stack:
            matches[open_stack.pop()] = index
        index += 1
    return matches


def extract_boxed_answers(text: str | None) -> list[str]:
    """Contents of every complete `\\boxed{...}` / `\\fbox{...}` (also `\\boxed 5`), in order."""
    if not text:
        return []
    answers = []
    matches = None
    for match in _BOX_PATTERN.finditer(text):
        rest = match.end()
        while rest < len(text) and text[rest] in " \t":
            rest += 1
        if rest < len(text) and text[rest] == "{":
            if matches is None:
                matches = _matching_braces(text)
            close = matches.get(rest)
            if close is None:
                continue  # truncated mid-box: the model never finished this answer
            answers.append(text[rest + 1 : close].strip())
        elif rest > match.end():
            # `\\boxed 5`: TeX's one-token argument form
            token = _BOX_TOKEN.match(text, rest)
            if token:
                answers.append(token.group(0))
    return answers


def extract_last_boxed(text: str | None) -> str | None:
    """The last complete boxed answer that is not empty, or None."""
    answers = [answer for answer in extract_boxed_answers(text) if answer]
    return answers[-1] if answers else None


def _strip_math_delimiters(answer: str) -> str:
    """`$x$`, `\\(x\\)`, `\\[x\\]`, `**x**`, a trailing full stop -> `x`."""
    if len(answer) > MAX_ANSWER_CHARS:
        return answer.strip()  # never equivalent anyway; peeling it layer by layer would be quadratic
    previous = None
    while previous != answer:
        previous = answer
        answer = answer.strip()
        for left, right in (("**", "**"), ("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if len(answer) >= len(left) + len(right) and answer.startswith(left) and answer.endswith(right):
                answer = answer[len(left) : len(answer) - len(right)]
        if answer.endswith(".") and not answer.endswith(".."):
            answer = answer[:-1]
    return answer.strip()


def extract_answer_line(text: str | None) -> str | None:
    """What follows `Answer:` on the last line that has one and says something, or None.
    A box on that line is unwrapped (`Answer: $\\boxed{5}$` -> `5`)."""
    if not text:
        return None
    for line in reversed(text.splitlines()):
        match = _ANSWER_LINE.match(line)
        if not match:
            continue
        content = match.group("content")
        boxed = extract_last_boxed(content)
        if boxed is not None:
            content = boxed
        content = _strip_math_delimiters(content)
        if content:
            return content
    return None


# --------------------------------------------------------------------------------- equivalence

def _math_verify():
    """Import math-verify quietly: it logs a warning for every timeout and disabled timeout."""
    import math_verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return math_verify


def _normalise_text(text: str) -> str:
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    return re.sub(r"[\s$.]+", " ", text).strip().lower()


@lru_cache(maxsize=4096)
def _parse_reference(reference: str, timeout_s: int | None):
    math_verify = _math_verify()
    latex = math_verify.parse(
        f"${reference}$",
        extraction_config=[math_verify.LatexExtractionConfig(), math_verify.ExprExtractionConfig()],
        parsing_timeout=timeout_s,
    )
    # plain-text references ("sqrt(3)/3") may parse better as expressions, but only a parse of the
    # whole text counts: math-verify reads "2^(n-1)" as 2 and "x=6, y=5" as 5, which "2" or "5" match
    plain = math_verify.parse(reference, extraction_config=[math_verify.ExprExtractionConfig()],
                              parsing_timeout=timeout_s)
    whole = re.sub(r"\s+", "", reference)
    if len(plain) == 2 and isinstance(plain[1], str) and re.sub(r"\s+", "", plain[1]) == whole:
        return latex + plain
    return latex


def _equivalent_here(answer: str, references: tuple[str, ...], timeout_s: int | None) -> bool:
    """The check itself, in this thread; `timeout_s=None` means unbounded (caller bounds it)."""
    math_verify = _math_verify()
    parsed_answer = None
    for reference in references:
        if _PLAIN_WORDS.match(reference.strip()):
            if _normalise_text(answer) == _normalise_text(reference):
                return True
            continue
        if parsed_answer is None:
            # boxing the answer makes math-verify take it whole (no hunting for "the last number")
            parsed_answer = math_verify.parse(
                "\\boxed{" + answer + "}",
                extraction_config=[math_verify.LatexExtractionConfig(boxed_match_priority=0),
                                   math_verify.ExprExtractionConfig()],
                parsing_timeout=timeout_s,
            )
            if not parsed_answer:
                parsed_answer = math_verify.parse(answer, parsing_timeout=timeout_s)
        gold = _parse_reference(reference, timeout_s)
        if gold and parsed_answer and math_verify.verify(gold, parsed_answer, timeout_seconds=timeout_s):
            return True
    return False


class _VerifyWorker:
    """A child Python running this file with `--serve`: one JSON request per stdin line, one
    verdict per stdout line. Its main thread may use signals, so math-verify's own timeouts
    work there too; a plain script (not multiprocessing) so no caller `__main__` is re-imported."""

    def __init__(self):
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read_replies, daemon=True).start()

    def _read_replies(self):
        for line in self.process.stdout:
            self.replies.put(line)
        self.replies.put(None)  # the worker is gone

    def ask(self, answer: str, references: tuple[str, ...], timeout_s: int, deadline_s: float) -> bool:
        self.process.stdin.write(json.dumps([answer, list(references), timeout_s]) + "\n")
        self.process.stdin.flush()
        reply = self.replies.get(timeout=deadline_s)  # queue.Empty when it overruns
        if reply is None:
            raise BrokenPipeError("verify worker exited")
        return bool(json.loads(reply))

    def kill(self):
        self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            try:
                pipe.close()
            except OSError:
                pass


def _worker_deadline_s(timeout_s: int, n_references: int) -> float:
    """Parse + verify per reference, each bounded by timeout_s inside the worker, plus start-up."""
    return timeout_s * (2 * n_references + 1) + 20.0


# one worker process per calling thread (thread ident -> worker), so threads grade in parallel
_workers: dict[int, _VerifyWorker] = {}
_workers_lock = threading.Lock()


def _bounded_in_worker(answer: str, references: tuple[str, ...], timeout_s: int) -> bool:
    """From a non-main thread: ask this thread's worker process, wait at most a bound on its time,
    and kill it if it overruns or dies (the next call starts a fresh one). Overrun = not equivalent."""
    ident = threading.get_ident()
    deadline_s = _worker_deadline_s(timeout_s, len(references))
    with _workers_lock:
        worker = _workers.get(ident)
    if worker is None or worker.process.poll() is not None:
        worker = _VerifyWorker()
        with _workers_lock:
            _workers[ident] = worker
    try:
        return worker.ask(answer, references, timeout_s, deadline_s)
    except (queue.Empty, BrokenPipeError, OSError, ValueError):
        worker.kill()
        with _workers_lock:
            _workers.pop(ident, None)
        return False


def close_workers(thread_idents=None) -> None:
    """Stop the worker processes of the given threads (default: all of them)."""
    with _workers_lock:
        idents = list(_workers) if thread_idents is None else [i for i in thread_idents if i in _workers]
        stopping = [_workers.pop(ident) for ident in idents]
    for worker in stopping:
        worker.kill()


atexit.register(close_workers)


def grade_many(items, timeout_s: int = DEFAULT_TIMEOUT_S, workers: int = 1) -> list[GradeResult]:
    """grade_response over (response, reference) pairs, in order. With `workers > 1` the checks run
    in that many worker processes at once (threads here, each with its own bounded worker)."""
    items = list(items)
    if workers <= 1 or len(items) < 2:
        return [grade_response(response, reference, timeout_s) for response, reference in items]
    pool_threads: set[int] = set()

    def grade_one(item):
        pool_threads.add(threading.get_ident())
        return grade_response(item[0], item[1], timeout_s)

    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="crisp-grade") as pool:
            return list(pool.map(grade_one, items))
    finally:
        close_workers(pool_threads)


def _serve() -> None:
    """The worker loop (`python grader.py --serve`)."""
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)  # run as a script: our sibling modules must not shadow installed packages
    for line in sys.stdin:
        answer, references, timeout_s = json.loads(line)
        try:
            verdict = _equivalent_here(answer, tuple(references), timeout_s)
        except Exception:  # a crash on one answer is a wrong answer, not a dead worker
            verdict = False
        sys.stdout.write(json.dumps(verdict) + "\n")
        sys.stdout.flush()


def is_equivalent(answer: str | None, reference: str | list[str] | tuple[str, ...],
                  timeout_s: int = DEFAULT_TIMEOUT_S) -> bool:
    """True when `answer` equals (any of) `reference` mathematically. A missing, empty or
    absurdly long answer is never equivalent; a check that times out counts as not equivalent."""
    if answer is None or not answer.strip() or len(answer) > MAX_ANSWER_CHARS:
        return False
    references = _as_references(reference)
    if not references:
        return False
    if threading.current_thread() is threading.main_thread():
        return _equivalent_here(answer.strip(), references, max(1, int(timeout_s)))
    return _bounded_in_worker(answer.strip(), references, max(1, int(timeout_s)))


def _as_references(reference) -> tuple[str, ...]:
    if isinstance(reference, str):
        candidates = [reference]
    elif isinstance(reference, (list, tuple)):
        candidates = list(reference)
    elif isinstance(reference, (int, float)) and not isinstance(reference, bool):
        candidates = [str(reference)]
    else:
        raise TypeError(f"reference must be a string or a list of strings, got {type(reference).__name__}")
    references = []
    for candidate in candidates:
        if isinstance(candidate, (int, float)) and not isinstance(candidate, bool):
            candidate = str(candidate)
        if not isinstance(candidate, str):
            raise TypeError(f"reference alternatives must be strings, got {type(candidate).__name__}")
        candidate = _strip_math_delimiters(candidate)
        if candidate:
            references.append(candidate)
    return tuple(references)


def grade_response(response: str | None, reference: str | list[str],
                   timeout_s: int = DEFAULT_TIMEOUT_S) -> GradeResult:
    """Grade one response against a reference (or a list of acceptable references)."""
    response = response or ""
    boxed = extract_last_boxed(response)
    answer_line = extract_answer_line(response)
    boxed_correct = is_equivalent(boxed, reference, timeout_s)
    if answer_line is not None and answer_line == boxed:
        answer_line_correct = boxed_correct  # "Answer: \boxed{x}" is one answer, check it once
    else:
        answer_line_correct = is_equivalent(answer_line, reference, timeout_s)
    return GradeResult(
        correct=boxed_correct or answer_line_correct,
        boxed_answer=boxed,
        answer_line=answer_line,
        boxed_correct=boxed_correct,
        answer_line_correct=answer_line_correct,
    )


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()

__all__ = [
    "GradeResult", "grade_response", "grade_many", "close_workers", "is_equivalent", "extract_boxed_answers", "extract_last_boxed",
    "extract_answer_line", "MAX_ANSWER_CHARS", "DEFAULT_TIMEOUT_S",
]
