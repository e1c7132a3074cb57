"""Problems from JSONL or parquet, and a deterministic, resumable stream of them.

Each record needs a text field (`data.field`, default "problem"); errors name the file and line.
Problems whose student or teacher prompt is longer than `data.max_prompt_tokens` are skipped and
counted — never truncated, which would cut the instruction or the problem silently.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """A data problem; the message names the file (and line)."""


def read_problems(path: str | Path, field: str = "problem", fmt: str = "auto") -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if fmt == "auto":
        fmt = "parquet" if path.suffix == ".parquet" else "jsonl"
    problems: list[str] = []
    if fmt == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as error:
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from error
        table = pq.read_table(path)
        if field not in table.column_names:
            raise DataError(f"{path}: no column {field!r} (columns: {', '.join(table.column_names)}); set data.field")
        for row, value in enumerate(table.column(field).to_pylist()):
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{path}: row {row}: {field!r} must be a non-empty string, got {value!r}")
            problems.append(value)
    else:
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
                if field not in record:
                    raise DataError(f"{path}:{line_number}: no field {field!r} (fields: {', '.join(record)}); set data.field")
                value = record[field]
                if not isinstance(value, str) or not value.strip():
                    raise DataError(f"{path}:{line_number}: {field!r} must be a non-empty string, got {value!r}")
                problems.append(value)
    if not problems:
        raise DataError(f"{path}: no problems found")
    return problems


@dataclass
class PromptPair:
    problem_index: int
    student_ids: list[int]
    teacher_ids: list[int]


def encode_problems(problems: list[str], encode, max_prompt_tokens: int) -> tuple[list[PromptPair], int]:
    """Encode every problem with `encode(problem) -> (student_ids, teacher_ids)`; returns the
    pairs that fit and the number skipped for length."""
    kept, skipped = [], 0
    for index, problem in enumerate(problems):
        student, teacher = encode(problem)
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
