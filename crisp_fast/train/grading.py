"""Grading rollouts while training, and samples to read.

A grader is any callable `grader(responses, records) -> list[bool]`: the decoded responses and
the problem records (dicts of the data file's fields) they answer. The default, used whenever
every problem has `data.answer_field`, is the eval module's dual-path math grader
(`crisp_fast.eval.grader`: the last `Answer:` line or the last `\\boxed{}`, math-verify); a task
with its own checker passes `Trainer(config, grader=...)` (the demo passes its world's).

Each step's metrics then hold `accuracy` (over this step's rollouts, all ranks), and the mean
length in tokens of the correct and of the wrong responses (`mean_tokens_correct`,
`mean_tokens_wrong`; None when there are none): a collapse shows as accuracy falling while the
responses shorten. Every `log.samples_every` steps, OUT/samples/step_XXXXXXXX.jsonl holds every
rollout of that step as {"step", "rank", "prompt", "response", "answer", "correct", "length",
"finish_reason"}.

math-verify bounds its time with `signal.alarm`, which works in the main thread only; the
trainer grades from its main thread, and `crisp_fast.eval.grader` moves the check to a bounded
child process when called from any other thread, so a hung sympy call never hangs training.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch.distributed as dist

from crisp_fast.eval.grader import DEFAULT_TIMEOUT_S, grade_many
from crisp_fast.train.fsdp import all_reduce_sum, is_distributed


class MathGrader:
    """The eval module's grader against `record[answer_field]` (text, number or a list of them)."""

    def __init__(self, answer_field: str = "answer", timeout_s: int = DEFAULT_TIMEOUT_S, workers: int = 1):
        self.answer_field, self.timeout_s, self.workers = answer_field, timeout_s, workers

    def __call__(self, responses: list[str], records: list[dict]) -> list[bool]:
        items = [(response, record[self.answer_field]) for response, record in zip(responses, records)]
        return [result.correct for result in grade_many(items, self.timeout_s, self.workers)]


def check_verdicts(verdicts, count: int) -> list[bool]:
    verdicts = list(verdicts)
    if len(verdicts) != count or not all(isinstance(v, bool) for v in verdicts):
        raise TypeError(f"a grader must return one bool per response ({count}), got {verdicts!r:.200}")
    return verdicts


def grade_rollouts(grader, responses: list[str], records: list[dict], lengths: list[int], device) -> tuple[dict, list]:
    """(global metrics, this rank's verdicts) for one step's rollouts."""
    verdicts = check_verdicts(grader(responses, records), len(responses)) if responses else []
    correct_tokens = sum(n for n, ok in zip(lengths, verdicts) if ok)
    wrong_tokens = sum(n for n, ok in zip(lengths, verdicts) if not ok)
    correct, total, correct_tokens, wrong_tokens = all_reduce_sum(
        [sum(verdicts), len(verdicts), correct_tokens, wrong_tokens], device)
    wrong = total - correct
    return {"accuracy": correct / total if total else None,
            "mean_tokens_correct": correct_tokens / correct if correct else None,
            "mean_tokens_wrong": wrong_tokens / wrong if wrong else None}, verdicts


def write_samples(out_dir: Path, step: int, rows: list[dict], rank: int) -> Path | None:
    """Gather every rank's rows to rank 0 and write OUT/samples/step_X.jsonl (atomically: a
    resumed run that redoes the step rewrites it whole)."""
    if is_distributed():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rows)
        rows = [row for share in gathered for row in share]
    if rank != 0:
        return None
    folder = Path(out_dir) / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:08d}.jsonl"
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(temporary, path)
    return path
