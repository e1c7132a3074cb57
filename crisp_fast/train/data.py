"""Problems from JSONL or parquet, and a deterministic, resumable stream of them.

Each record is a JSON object (a parquet row); chat prompts need its text field (`data.field`,
default "problem"), raw templates the fields they name; `data.answer_field` ("answer"), when
every record has it, is what rollouts are graded against. Errors name the file and line.
Problems whose student or teacher prompt is longer than `data.max_prompt_tokens` are skipped and
counted — never truncated, which would cut the instruction or the problem silently.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from crisp_fast.train.prompts import PromptError


class DataError(ValueError):
    """A data problem; the message names the file (and line)."""


def read_records(path: str | Path, fmt: str = "auto") -> list[tuple[str, dict]]:
    """Every record of a JSONL or parquet file as (where, record), `where` being "file:line" (or
    "file: row N") for error messages. Any decode error (bad UTF-8, bad JSON) names file:line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if fmt == "auto":
        fmt = "parquet" if path.suffix == ".parquet" else "jsonl"
    records: list[tuple[str, dict]] = []
    if fmt == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as error:
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from error
        try:
            table = pq.read_table(path)
        except Exception as error:  # pyarrow raises several types for unreadable files
            raise DataError(f"{path}: cannot read as parquet: {error}") from error
        records = [(f"{path}: row {row}", record) for row, record in enumerate(table.to_pylist())]
    else:
        with path.open("rb") as handle:  # bytes, decoded line by line: a bad byte's error names its line
            for line_number, raw in enumerate(handle, start=1):
                where = f"{path}:{line_number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise DataError(f"{where}: not valid UTF-8 (byte 0x{raw[error.start]:02x} at column "
                                    f"{error.start + 1})") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{where}: not valid JSON ({error.msg})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
                records.append((where, record))
    if not records:
        raise DataError(f"{path}: no problems found")
    return records


def check_problem_field(records: list[tuple[str, dict]], field: str) -> None:
    for where, record in records:
        if field not in record:
            raise DataError(f"{where}: no field {field!r} (fields: {', '.join(map(str, record))}); set data.field")
        value = record[field]
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: {field!r} must be a non-empty string, got {value!r}")


def has_answers(records: list[tuple[str, dict]], field: str) -> bool:
    """True when every record has an answer (text, a number, or a list of them); False when none
    has the field. Some with and some without is an error: a partial accuracy would mislead."""
    present = [field in record for _, record in records]
    if not any(present):
        return False
    for where, record in records:
        if field not in record:
            raise DataError(f"{where}: no {field!r} field, while other problems have one (graded training needs "
                            f"it on every problem; fields here: {', '.join(map(str, record))})")
        value = record[field]
        values = value if isinstance(value, list) and value else [value]
        if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) and str(v).strip() for v in values):
            raise DataError(f"{where}: {field!r} must be text, a number or a list of them, got {value!r}")
    return True


def read_problems(path: str | Path, field: str = "problem", fmt: str = "auto") -> list[str]:
    """The problem texts (`field`) of a JSONL or parquet file."""
    records = read_records(path, fmt)
    check_problem_field(records, field)
    return [record[field] for _, record in records]


@dataclass
class PromptPair:
    problem_index: int
    student_ids: list[int]
    teacher_ids: list[int]


def encode_problems(problems: list, encode, max_prompt_tokens: int,
                    locations: list[str] | None = None) -> tuple[list[PromptPair], int]:
    """Encode every problem (a text or a record) with `encode(problem) -> (student_ids,
    teacher_ids)`; returns the pairs that fit and the number skipped for length. A prompt that
    cannot be built is a DataError naming `locations[index]` (file:line)."""
    kept, skipped = [], 0
    for index, problem in enumerate(problems):
        try:
            student, teacher = encode(problem)
        except PromptError as error:
            where = locations[index] if locations else f"problem {index}"
            raise DataError(f"{where}: {error}") from None
        if max(len(student), len(teacher)) > max_prompt_tokens:
            skipped += 1
            continue
        kept.append(PromptPair(index, student, teacher))
    return kept, skipped


class ProblemStream:
    """An endless, seeded sequence of prompts: epoch e is a permutation drawn from (seed, e).
    `position` (how many have been taken) is all a checkpoint needs to resume it exactly."""

    def __init__(self, items: list, *, seed: int = 0, shuffle: bool = True, position: int = 0):
        if not items:
            raise DataError("no usable problems (all were skipped, or the file is empty)")
        self.items, self.seed, self.shuffle, self.position = items, seed, shuffle, position

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.items)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, count: int) -> list:
        batch = []
        for _ in range(count):
            epoch, offset = divmod(self.position, len(self.items))
            batch.append(self.items[self._order(epoch)[offset]])
            self.position += 1
        return batch
