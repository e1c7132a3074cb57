"""Evaluation problem sets: local JSONL / JSON / parquet files, the MATH-500 and AIME formats,
Hugging Face dataset names (when a hub is reachable), and CHAMP (270 problems shipped in the
`champ-dataset` package: an offline set that always works).

    from crisp_fast.eval.problems import load_problems
    name, problems = load_problems("champ")                     # offline
    name, problems = load_problems("data/math500.jsonl")        # problem/answer fields found by name
    name, problems = load_problems("math500")                   # HuggingFaceH4/MATH-500 via `datasets`

Every bad input raises `DataError` naming the file and line (or row) it came from.
(Named `problems`, not `datasets`, so that it never shadows the `datasets` package.)
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache

# field names tried in order when the caller does not name one
PROBLEM_FIELDS = ("problem", "question", "Problem", "Question", "prompt", "input")
ANSWER_FIELDS = ("answer", "Answer", "expected_answer", "final_answer", "gold", "target")
ID_FIELDS = ("unique_id", "id", "ID", "problem_id", "idx", "index")
SUBSET_FIELDS = ("subject", "subset", "type", "category")
LEVEL_FIELDS = ("level", "difficulty")

# short names for the paper's benchmarks: (hub dataset, split, display name)
HUB_ALIASES = {
    "math500": ("HuggingFaceH4/MATH-500", "test", "MATH-500"),
    "math-500": ("HuggingFaceH4/MATH-500", "test", "MATH-500"),
    "aime24": ("HuggingFaceH4/aime_2024", "train", "AIME-2024"),
    "aime2024": ("HuggingFaceH4/aime_2024", "train", "AIME-2024"),
    "aime25": ("math-ai/aime25", "test", "AIME-2025"),
    "aime2025": ("math-ai/aime25", "test", "AIME-2025"),
}


class DataError(ValueError):
    """A problem file (or row) that cannot be used; the message names the file and line."""


@dataclass
class Problem:
    """One evaluation problem. `answers` are the acceptable references (usually one); `answer`
    is the first, for display."""

    problem_id: str
    problem: str
    answers: list[str]
    subset: str | None = None
    level: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def answer(self) -> str:
        return self.answers[0]


@dataclass
class FieldNames:
    """Which row fields hold what; None means "find it among the usual names"."""

    problem: str | None = None
    answer: str | None = None
    problem_id: str | None = None
    subset: str | None = None
    level: str | None = None


def read_jsonl(path: str):
    """Yield (line number, row dict) for each non-blank line; DataError naming file:line else."""
    try:
        handle = open(path, encoding="utf-8")
    except OSError as error:
        raise DataError(f"{path}: cannot read: {error.strerror or error}") from error
    with handle:
        for line_number, raw in enumerate(handle.buffer, start=1):  # bytes: a bad byte's error names its line
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path}:{line_number}: not UTF-8 text ({error.reason}: byte 0x{raw[error.start]:02x} "
                                f"at column {error.start + 1})") from error
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_number}: not valid JSON ({error.msg} at column {error.colno})") from error
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
            yield line_number, row


def _pick(row: dict, explicit: str | None, candidates: tuple[str, ...], what: str, where: str, required: bool):
    if explicit is not None:
        if explicit not in row:
            raise DataError(f"{where}: no {what} field {explicit!r} (fields: {', '.join(map(str, row)) or 'none'})")
        return row[explicit]
    for name in candidates:
        if name in row and row[name] is not None:
            return row[name]
    if required:
        raise DataError(f"{where}: no {what} field (tried {', '.join(candidates)}; fields: "
                        f"{', '.join(map(str, row)) or 'none'}); name it with --{what}-field")
    return None


def _as_text(value, what: str, where: str) -> str:
    if isinstance(value, bool) or value is None:
        raise DataError(f"{where}: {what} must be text or a number, got {value!r}")
    if isinstance(value, (int, float, str)):
        text = str(value).strip()
        if not text:
            raise DataError(f"{where}: {what} is empty")
        return text
    raise DataError(f"{where}: {what} must be text or a number, got {type(value).__name__}")


def _answers(value, where: str) -> list[str]:
    if isinstance(value, (list, tuple)):
        if not value:
            raise DataError(f"{where}: answer list is empty")
        return [_as_text(item, "answer", where) for item in value]
    return [_as_text(value, "answer", where)]


def problem_from_row(row: dict, index: int, where: str, fields: FieldNames = FieldNames()) -> Problem:
    """A Problem from one dataset row; `where` ("file:line") is what errors name."""
    text = _as_text(_pick(row, fields.problem, PROBLEM_FIELDS, "problem", where, True), "problem", where)
    raw_answer = _pick(row, fields.answer, ANSWER_FIELDS, "answer", where, False)
    if raw_answer is None and fields.answer is None and isinstance(row.get("solution"), str):
        # the original MATH format has no answer field: the reference is the solution's last box
        from crisp_fast.eval.grader import extract_last_boxed

        raw_answer = extract_last_boxed(row["solution"])
    if raw_answer is None:
        _pick(row, fields.answer, ANSWER_FIELDS, "answer", where, True)  # raises, naming the fields
    identifier = _pick(row, fields.problem_id, ID_FIELDS, "id", where, False)
    subset = _pick(row, fields.subset, SUBSET_FIELDS, "subset", where, False)
    level = _pick(row, fields.level, LEVEL_FIELDS, "level", where, False)
    return Problem(
        problem_id=str(identifier) if identifier is not None else str(index),
        problem=text,
        answers=_answers(raw_answer, where),
        subset=str(subset) if subset is not None else None,
        level=str(level) if level is not None else None,
    )


def _rows_from_file(path: str):
    """(location, row) pairs from a .jsonl / .json / .parquet file."""
    lower = path.lower()
    if lower.endswith(".parquet"):
        try:
            import pyarrow.parquet as parquet

            table = parquet.read_table(path)
        except Exception as error:  # pyarrow raises several types for unreadable files
            raise DataError(f"{path}: cannot read as parquet: {error}") from error
        return [(f"{path}: row {index + 1}", row) for index, row in enumerate(table.to_pylist())]
    if lower.endswith(".json"):
        try:
            with open(path, "rb") as handle:
                raw = handle.read()
            data = json.loads(raw.decode("utf-8"))
        except OSError as error:
            raise DataError(f"{path}: cannot read: {error.strerror or error}") from error
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from error
        except UnicodeDecodeError as error:
            line = raw[:error.start].count(b"\n") + 1
            raise DataError(f"{path}:{line}: not UTF-8 text ({error.reason})") from error
        if isinstance(data, dict):
            data = next((value for value in data.values() if isinstance(value, list)), None)
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a list of problem objects (or an object holding one)")
        rows = []
        for index, row in enumerate(data):
            if not isinstance(row, dict):
                raise DataError(f"{path}: item {index + 1}: expected a JSON object, got {type(row).__name__}")
            rows.append((f"{path}: item {index + 1}", row))
        return rows
    return [(f"{path}:{line_number}", row) for line_number, row in read_jsonl(path)]


# sentences CHAMP uses around a mathematical answer; group 1 is the answer
_CHAMP_SENTENCES = (
    r"^The (?:limit exists and is equal to|only possible value for the limit is)\s+(.+)$",
    r"^At most (\d+)\s+[a-z\- ]+$",
    r"^(-?\d+(?:/\d+)?)\s+(?:is the only possible value|[a-z][a-z\- ]*)$",
)


def _looks_like_math(text: str) -> bool:
    """A digit or an operator, and no English word of three letters or more but sqrt."""
    words = [word for word in re.findall(r"[A-Za-z]{3,}", text) if word != "sqrt"]
    return bool(re.search(r"[\d()/^*+\-=]", text)) and not words


def champ_answers(raw: str) -> list[str]:
    """CHAMP writes answers for people: "C(10, 5), or equivalently 252", "0 (i.e., no real-valued
    zeros)", "The limit exists and is equal to (a+3b)/2". Each "or equivalently" part is an
    acceptable reference, a trailing explanation in parentheses is dropped, and a sentence also
    offers the expression it ends with."""
    answers: list[str] = []
    for part in re.split(r",?\s*or (?:equivalently|an equivalent form such as),?\s*", raw):
        part = part.strip()
        explanation = re.search(r"\s+\((?:i\.e\.|e\.g\.|that is|none|no )", part)
        if explanation and part.endswith(")"):
            part = part[: explanation.start()].strip()
        if not part:
            continue
        # CHAMP's plain-text sums, "sum_(i=1)^n i^2", read as LaTeX sums (math-verify reads i=1 as 1)
        part = re.sub(r"\bsum_\((\w+=\w+)\)\^(\w+)", r"\\sum_{\1}^{\2}", part)
        answers.append(part)
        for pattern in _CHAMP_SENTENCES:
            sentence = re.match(pattern, part)
            if sentence and _looks_like_math(sentence.group(1)) and sentence.group(1) not in answers:
                answers.append(sentence.group(1))
    return answers or [raw]


@lru_cache(maxsize=2)
def _champ_items(version: str) -> tuple[tuple[str, str, str, str], ...]:
    # the package parses its whole JSON (solutions, conversations) on every load: seconds; do it once
    try:
        import champ_dataset
    except ImportError as error:
        raise DataError("the CHAMP set needs the champ-dataset package: pip install champ-dataset") from error
    dataset = champ_dataset.load(version)
    return tuple((identifier, item.text, item.answer, item.category) for identifier, item in dataset.problems.items())


def load_champ(version: str = "v0") -> list[Problem]:
    """The 270 CHAMP competition problems (subset = category), from the installed package."""
    return [Problem(problem_id=identifier, problem=text, answers=champ_answers(answer), subset=category,
                    extra={"raw_answer": answer})
            for identifier, text, answer, category in _champ_items(version)]


def _load_hub(name: str, split: str | None, fields: FieldNames) -> list[Problem]:
    try:
        import datasets
    except ImportError as error:
        raise DataError(f"{name}: not a local file, and loading hub datasets needs `pip install datasets`") from error
    try:
        dataset = datasets.load_dataset(name, split=split or "test")
    except Exception as error:  # offline, unknown name, unknown split: all one message to the user
        raise DataError(f"{name}: not a local file, and the hub dataset could not be loaded "
                        f"(split {split or 'test'!r}): {type(error).__name__}: {error}. Offline? Save it as "
                        f"JSONL/parquet and pass the file; --data champ always works offline") from error
    return [problem_from_row(dict(row), index, f"{name}[{split or 'test'}]: row {index + 1}", fields)
            for index, row in enumerate(dataset)]


def load_problems(source: str, *, fields: FieldNames = FieldNames(), split: str | None = None,
                  limit: int | None = None) -> tuple[str, list[Problem]]:
    """(display name, problems) for `source`: "champ", a short name (math500, aime24, aime25),
    a local file, or a Hugging Face dataset name ("org/name", with `split`)."""
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1, got {limit}")
    key = source.strip().lower()
    if key in ("champ", "champ:v0") and not os.path.exists(source):
        name, problems = "CHAMP", load_champ()
    elif os.path.isdir(source):
        raise DataError(f"{source}: is a directory; give a .jsonl, .json or .parquet file")
    elif os.path.exists(source):
        rows = _rows_from_file(source)
        problems = [problem_from_row(row, index, where, fields) for index, (where, row) in enumerate(rows)]
        name = os.path.splitext(os.path.basename(source))[0]
    elif key in HUB_ALIASES:
        hub_name, default_split, name = HUB_ALIASES[key]
        problems = _load_hub(hub_name, split or default_split, fields)
    elif "/" in source and not source.startswith((".", "/")) and not os.path.splitext(source)[1]:
        problems, name = _load_hub(source, split, fields), source.split("/")[-1]
    else:
        raise DataError(f"{source}: no such file")
    if not problems:
        raise DataError(f"{source}: holds no problems")
    seen: set[str] = set()
    for problem in problems:
        if problem.problem_id in seen:
            raise DataError(f"{source}: problem id {problem.problem_id!r} appears twice (name the id field with --id-field)")
        seen.add(problem.problem_id)
    return name, problems[:limit] if limit else problems


__all__ = ["Problem", "FieldNames", "DataError", "load_problems", "load_champ", "champ_answers",
           "problem_from_row", "read_jsonl", "HUB_ALIASES"]
