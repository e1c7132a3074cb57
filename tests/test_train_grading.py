"""Grading and samples while training, LR schedules, validation and the best checkpoint.
Accuracy and lengths are recounted from the samples files; the schedule is compared with its
closed form; a resumed scheduled run equals an uninterrupted one. ~60 s on 2 busy CPU cores."""
import json
import math
import random
import shutil

import pytest

from crisp_fast.train import Trainer, train
from crisp_fast.train.data import DataError
from crisp_fast.train.grading import MathGrader, grade_rollouts
from crisp_fast.train.schedule import LrShape
from crisp_fast.train.tiny import tiny_config

TIMING = {"rollout_seconds", "train_seconds", "step_seconds", "tokens_per_second", "train_tokens_per_second",
          "peak_memory_bytes"}


def problems_with_answers(path, count, rng):
    with path.open("w") as handle:
        for _ in range(count):
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            handle.write(json.dumps({"problem": f"{a}+{b}?", "answer": str(a + b)}) + "\n")
    return path


def test_math_grader_metrics_on_hand_written_rollouts():
    responses = ["so 3+4=7\nAnswer: 7", "it is \\boxed{7}", "Answer: 8", "", "\\boxed{\\frac{14}{2}}"]
    lengths = [9, 5, 3, 0, 7]
    metrics, verdicts = grade_rollouts(MathGrader(), responses, [{"answer": "7"}] * 5, lengths, "cpu")
    assert verdicts == [True, True, False, False, True]
    assert metrics == {"accuracy": 3 / 5, "mean_tokens_correct": (9 + 5 + 7) / 3, "mean_tokens_wrong": 3 / 2}
    none_right, _ = grade_rollouts(MathGrader(), ["Answer: 1"], [{"answer": [2, "3"]}], [4], "cpu")
    assert none_right == {"accuracy": 0.0, "mean_tokens_correct": None, "mean_tokens_wrong": 4.0}
    with pytest.raises(TypeError, match="one bool per response"):
        grade_rollouts(lambda r, p: [True], ["a", "b"], [{}, {}], [1, 1], "cpu")


def test_step_accuracy_and_samples_agree_with_a_recount(tmp_path, seed):
    rng = random.Random(seed)
    data = problems_with_answers(tmp_path / "problems.jsonl", 6, rng)

    def parity(responses, records):  # a custom grader: a random model is never right in arithmetic
        return [len(response) % 2 == 0 for response in responses]

    overrides = ["train.steps=3", "log.samples_every=1", "rollout.n=2", "train.max_response_tokens=0"]
    result = Trainer(tiny_config(data, tmp_path / "out", overrides), grader=parity).run()
    for row in result.history:
        samples = [json.loads(line) for line in
                   (tmp_path / f"out/samples/step_{row['step']:08d}.jsonl").read_text().splitlines()]
        assert len(samples) == 4 and row["responses"] == sum(s["length"] > 0 for s in samples)  # empty ones not trained
        assert all(s["correct"] == (len(s["response"]) % 2 == 0) for s in samples)
        assert row["accuracy"] == pytest.approx(sum(s["correct"] for s in samples) / len(samples))
        assert sum(s["length"] for s in samples) == row["response_tokens"]
        for flag, key in ((True, "mean_tokens_correct"), (False, "mean_tokens_wrong")):
            chosen = [s["length"] for s in samples if s["correct"] is flag]
            assert row[key] == (pytest.approx(sum(chosen) / len(chosen)) if chosen else None)
        assert {s["answer"] for s in samples} <= {json.loads(line)["answer"] for line in data.read_text().splitlines()}
    # the default grader (math) runs whenever every problem has an answer
    trainer = Trainer(tiny_config(data, tmp_path / "default", ["train.steps=1"]))
    assert isinstance(trainer.grader, MathGrader)
    assert "accuracy" in trainer.train_step()
    # some problems with an answer and some without: an error naming the first without
    (tmp_path / "mixed.jsonl").write_text(data.read_text() + json.dumps({"problem": "1+1?"}) + "\n")
    with pytest.raises(DataError, match=r"mixed.jsonl:7: no 'answer' field, while other problems have one"):
        Trainer(tiny_config(tmp_path / "mixed.jsonl", tmp_path / "mixed", []))


@pytest.mark.parametrize("schedule,warmup,steps", [("constant", 2, 5), ("linear", 0, 4), ("cosine", 2, 6),
                                                   ("linear", 3, 3)])
def test_lr_schedule_is_its_closed_form(schedule, warmup, steps):
    shape = LrShape(schedule, warmup, steps)
    for step in range(steps):
        if step < warmup:
            expected = (step + 1) / warmup
        elif schedule == "constant":
            expected = 1.0
        else:
            progress = (step - warmup) / max(steps - warmup, 1)
            expected = 1 - progress if schedule == "linear" else (1 + math.cos(math.pi * progress)) / 2
        assert shape(step) == pytest.approx(expected, abs=1e-12)
        assert 0 < shape(step) <= 1


def test_scheduled_run_logs_its_lr_and_resumes_on_schedule(tmp_path, seed):
    data = problems_with_answers(tmp_path / "problems.jsonl", 6, random.Random(seed))
    overrides = ["train.steps=5", "train.lr_schedule=cosine", "train.warmup_steps=2", "train.lr=0.002",
                 "checkpoint.every=1", "checkpoint.keep=5", "checkpoint.resume=auto", "rollout.n=1",
                 "rollout.max_new_tokens=6"]
    reference = train(tiny_config(data, tmp_path / "reference", overrides))
    shape = LrShape("cosine", 2, 5)
    assert [row["lr"] for row in reference.history] == pytest.approx([0.002 * shape(s) for s in range(5)])
    # resume from step 2 (later checkpoints gone): the same lrs, the same metrics
    run = tmp_path / "resumed"
    shutil.copytree(tmp_path / "reference", run)
    for step in (3, 4, 5):
        shutil.rmtree(run / f"checkpoints/step_{step:08d}")
    train(tiny_config(data, run, overrides))

    def comparable(path):
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in path.read_text().splitlines()]

    assert comparable(run / "metrics.jsonl") == comparable(tmp_path / "reference/metrics.jsonl")


def test_validation_metrics_and_the_best_checkpoint(tmp_path, seed):
    rng = random.Random(seed)
    data = problems_with_answers(tmp_path / "problems.jsonl", 6, rng)
    held_out = problems_with_answers(tmp_path / "held_out.jsonl", 3, rng)

    def parity(responses, records):
        return [len(response) % 2 == 0 for response in responses]

    overrides = ["train.steps=3", "eval.every=2", f"eval.data={held_out}", "eval.samples=2", "eval.max_new_tokens=8",
                 "eval.best_metric=penalized_accuracy", "eval.length_penalty=0.5", "rollout.max_new_tokens=6"]
    result = Trainer(tiny_config(data, tmp_path / "out", overrides), grader=parity).run()
    evaluated = [row for row in result.history if "eval_accuracy" in row]
    assert [row["step"] for row in evaluated] == [2, 3]  # every 2 steps, and the last
    for row in evaluated:
        assert row["eval_accuracy"] in {i / 6 for i in range(7)}  # 3 problems x 2 samples
        assert 1 <= row["eval_mean_tokens"] <= 8
        assert row["eval_score"] == pytest.approx(row["eval_accuracy"] - 0.5 * row["eval_mean_tokens"] / 8)
    best = max(evaluated, key=lambda row: (row["eval_score"], -row["step"]))
    kept = sorted(p.name for p in (tmp_path / "out/best").iterdir())
    assert kept == [f"step_{best['step']:08d}"]
    assert (tmp_path / "out/best" / kept[0] / "manifest.json").is_file()
    # validation needs answers (or a grader)
    (tmp_path / "no_answers.jsonl").write_text(json.dumps({"problem": "1+1?"}) + "\n")
    with pytest.raises(DataError, match="validation needs an answer on every problem"):
        Trainer(tiny_config(data, tmp_path / "bad", ["eval.every=1", f"eval.data={tmp_path / 'no_answers.jsonl'}"]))
