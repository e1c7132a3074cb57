"""The demo's toy reasoning world: add k one-digit numbers, with verbose and concise solutions.

A problem at difficulty k is `k` numbers in 1..9 joined by "+" (k = 2..5). Its solution has
k - 1 NECESSARY lines (the running sums, "8+2=10": a 0.8M-parameter model cannot add six numbers
in its head, so dropping one of them costs accuracy) and REDUNDANT lines of two kinds:

* a fixed overhead that does not grow with difficulty: a preamble line before the first step and
  a re-check line before the answer (`PREAMBLE`, `FINAL_CHECK`), each written with probability
  `OVERHEAD_PROB`;
* a restatement after each step ("so far 10"), written with probability `REDUNDANT_STEP_PROB`.

Every solution ends with the answer line `Answer: 17` that `grade` checks. The fixed overhead is
what lets "easy problems are compressed more than hard ones" be true or false: a concise style
that keeps every necessary step removes a larger share of an easy solution (whose length is
mostly overhead) than of a hard one; a concise style that also drops necessary steps would
compress hard problems as much or more, and lose accuracy there. With the overhead switched off
(`verbose_solution(..., fixed_overhead=False)`) the redundant share of a verbose solution even
grows with k (~29% of the characters at k = 2, ~41% at k = 5: the answer line is a fixed
NECESSARY part), and the claim would come out false (the design card measured 43-52% across k
with a frozen teacher in such a world). With it, the share is ~75% at k = 2 and ~64% at k = 5.

Line starts are chosen so that the choice "redundant or necessary" is made by one character:
necessary lines start with a digit, the answer with "A", the preamble with "L", restatements
with "s" and the re-check with "D". `make_base` trains the instructed (teacher) context never to
emit those first characters, so after any verbose prefix the teacher prefers to continue
concisely, which is the signal CRISP distils.
"""
from __future__ import annotations

import dataclasses
import random
import re

LEVELS = (2, 3, 4, 5)
PREAMBLE = "Let me add them one by one."
FINAL_CHECK = "Double-check: all steps ok."
REDUNDANT_STEP_PROB = 0.7  # > 0.5 so that the greedy base writes the restatements too
# > 0.5 so that the greedy base writes them; < 1 so that the verbose student keeps some probability
# of starting with the first step and of answering right after the last one. Reverse KL moves a
# student's mass only among tokens it already gives some: with the overhead always written, CRISP
# runs on the demo moved the first token's mass to "A" ("Answer: ..." before any step) and
# collapsed, or lost 3-4 points of accuracy on the way.
OVERHEAD_PROB = 0.75

# The prompt texts, rendered by the trainer's own prompt code (crisp_fast.train.prompts, placement
# "header": the conciseness instruction replaces the student's header, as in the paper), so the
# base model is trained on exactly the prompts the trainer will show it. Short, because every
# character is a token.
STUDENT_HEADER = "Add step by step."
TEACHER_INSTRUCTION = "Add concisely; keep needed steps."
ANSWER_FORMAT = "Last line: Answer: N"

ANSWER_PATTERN = re.compile(r"^Answer: (-?\d+)$")


@dataclasses.dataclass(frozen=True)
class Problem:
    numbers: tuple[int, ...]

    @property
    def level(self) -> int:
        return len(self.numbers)

    @property
    def text(self) -> str:
        return "+".join(str(n) for n in self.numbers)

    @property
    def answer(self) -> int:
        return sum(self.numbers)


def sample_problem(rng: random.Random, level: int) -> Problem:
    if level < 2:
        raise ValueError(f"level must be >= 2 (numbers to add), got {level}")
    return Problem(tuple(rng.randint(1, 9) for _ in range(level)))


def problem_set(seed: int, per_level: int, levels=LEVELS) -> list[Problem]:
    """`per_level` problems at each level, from their own seeded stream (held-out sets use a
    seed that training never uses)."""
    rng = random.Random(seed)
    return [sample_problem(rng, level) for level in levels for _ in range(per_level)]


def necessary_lines(problem: Problem) -> list[str]:
    lines, total = [], problem.numbers[0]
    for number in problem.numbers[1:]:
        lines.append(f"{total}+{number}={total + number}")
        total += number
    return lines


def solution_segments(problem: Problem, rng: random.Random, *, preamble: bool, final_check: bool,
                      step_prob: float) -> list[tuple[str, bool]]:
    """The solution as (line, is_redundant) pairs; the answer line is last."""
    segments: list[tuple[str, bool]] = []
    if preamble:
        segments.append((PREAMBLE, True))
    for line in necessary_lines(problem):
        segments.append((line, False))
        if rng.random() < step_prob:
            segments.append((f"so far {line.split('=')[1]}", True))
    if final_check:
        segments.append((FINAL_CHECK, True))
    segments.append((f"Answer: {problem.answer}", False))
    return segments


def verbose_segments(problem: Problem, rng: random.Random, *, fixed_overhead: bool = True,
                     step_prob: float = REDUNDANT_STEP_PROB) -> list[tuple[str, bool]]:
    """The verbose style's (line, is_redundant) pairs: what the base writes without the instruction."""
    preamble = fixed_overhead and rng.random() < OVERHEAD_PROB
    final_check = fixed_overhead and rng.random() < OVERHEAD_PROB
    return solution_segments(problem, rng, preamble=preamble, final_check=final_check, step_prob=step_prob)


def verbose_solution(problem: Problem, rng: random.Random, *, fixed_overhead: bool = True,
                     step_prob: float = REDUNDANT_STEP_PROB) -> str:
    segments = verbose_segments(problem, rng, fixed_overhead=fixed_overhead, step_prob=step_prob)
    return "\n".join(line for line, _ in segments)


def concise_solution(problem: Problem) -> str:
    return "\n".join(necessary_lines(problem) + [f"Answer: {problem.answer}"])


def extract_answer(response: str) -> int | None:
    """The integer on the last non-empty line if that line is exactly `Answer: <int>`, else None
    (anything after the answer line, a missing line, or a malformed number makes it None)."""
    lines = [line.strip() for line in response.strip().splitlines() if line.strip()]
    if not lines:
        return None
    match = ANSWER_PATTERN.match(lines[-1])
    if match is None:
        return None
    return int(match.group(1))


def grade(response: str, problem: Problem | int) -> bool:
    """True iff the response's final line is `Answer: N` with N the problem's sum."""
    expected = problem.answer if isinstance(problem, Problem) else int(problem)
    got = extract_answer(response)
    return got is not None and got == expected


def parse_problem(text: str) -> Problem:
    """The inverse of `Problem.text` (for prompts read back from logs)."""
    if not re.fullmatch(r"[1-9](\+[1-9])+", text.strip()):
        raise ValueError(f"not a demo problem: {text!r}")
    return Problem(tuple(int(part) for part in text.strip().split("+")))
