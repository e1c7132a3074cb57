"""End-to-end tests for `crisp-fast grade` and `crisp-fast compare` (crisp_fast.eval.cli), the
summary/comparison numbers (crisp_fast.eval.report), and bad inputs: missing fields, malformed
or unreadable files give an error naming the file and line. Budget: ~15 s.

    PYTHONPATH=. pytest tests/test_eval_cli.py -q
"""
import json
import random
from statistics import mean

import pytest

from crisp_fast.cli import main as crisp_fast_main
from crisp_fast.eval.cli import compare_main, grade_main
from crisp_fast.eval.report import comparison_rows, summarize


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def random_responses(rng, n):
    """Rows with a known verdict: right or wrong, boxed or on an answer line, or no answer."""
    rows, verdicts = [], []
    for index in range(n):
        value = rng.randint(-50, 50)
        kind = rng.choice(["box", "line", "wrong", "none", "frac"])
        response = {"box": f"thus \\boxed{{{value}}}", "line": f"...\nAnswer: {value}",
                    "wrong": f"\\boxed{{{value + 1}}}", "none": "I am not sure.",
                    "frac": f"\\boxed{{\\frac{{{2 * value}}}{{2}}}}"}[kind]
        rows.append({"id": index, "answer": str(value), "response": response, "extra": [index]})
        verdicts.append(kind in ("box", "line", "frac"))
    return rows, verdicts


def test_grade_cli_end_to_end(tmp_path, seed, capsys):
    rng = random.Random(seed)
    rows, verdicts = random_responses(rng, 12)
    source, out = tmp_path / "responses.jsonl", tmp_path / "graded.jsonl"
    write_jsonl(source, rows)
    assert grade_main([str(source), "--out", str(out)]) == 0
    graded = read_jsonl(out)
    assert [row["correct"] for row in graded] == verdicts
    for original, row in zip(rows, graded):
        assert {key: row[key] for key in original} == original  # input fields kept as they were
        for key in ("boxed_answer", "answer_line", "boxed_correct", "answer_line_correct"):
            assert key in row
    printed = capsys.readouterr().out
    assert f"accuracy {100 * mean(verdicts):.2f}%" in printed
    # the same in two grading processes at once
    assert grade_main([str(source), "--out", str(tmp_path / "parallel.jsonl"), "--workers", "2"]) == 0
    assert read_jsonl(tmp_path / "parallel.jsonl") == graded
    # through the top-level dispatcher, with renamed fields and the default output path
    renamed = [{"gold": row["answer"], "text": row["response"]} for row in rows]
    write_jsonl(tmp_path / "renamed.jsonl", renamed)
    assert crisp_fast_main(["grade", str(tmp_path / "renamed.jsonl"), "--answer-field", "gold",
                            "--response-field", "text"]) == 0
    assert [row["correct"] for row in read_jsonl(tmp_path / "renamed.graded.jsonl")] == verdicts


@pytest.mark.parametrize("content,line,message", [
    ('{"answer": "1", "response": "Answer: 1"}\n{"response": "Answer: 2"}\n', 2, "no 'answer' field"),
    ('{"answer": "1", "response": "x"}\n\n{"answer": "1", "respons": "x"}\n', 3, "no 'response' field"),
    ('{"answer": "1", "response": "x"}\n{"answer": "1", "response": \n', 2, "not valid JSON"),
    ('[1, 2]\n', 1, "expected a JSON object"),
    ('{"answer": null, "response": "x"}\n', 1, "must be text"),
    ('{"answer": "1", "response": 5}\n', 1, "must be text"),
])
def test_grade_cli_bad_rows_name_file_and_line(tmp_path, capsys, content, line, message):
    source = tmp_path / "bad.jsonl"
    source.write_text(content)
    assert grade_main([str(source), "--out", str(tmp_path / "out.jsonl")]) == 2
    error = capsys.readouterr().err
    assert f"{source}:{line}" in error and message in error
    assert not (tmp_path / "out.jsonl").exists()


def test_grade_cli_unreadable_and_empty_files(tmp_path, capsys):
    assert grade_main([str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: cannot read" in capsys.readouterr().err
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    assert grade_main([str(tmp_path / "binary.jsonl")]) == 2
    assert "binary.jsonl" in capsys.readouterr().err
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert grade_main([str(tmp_path / "empty.jsonl")]) == 2
    assert "no responses" in capsys.readouterr().err


def fake_summary(rng, model, dataset, n_problems=6, k=4):
    rows = []
    for p in range(n_problems):
        for s in range(k):
            rows.append({"problem_id": f"{dataset}-{p}", "correct": rng.random() < 0.6,
                         "tokens": rng.randint(10, 5000), "finish_reason": rng.choice(["stop", "stop", "length"])})
    return summarize(rows, model=model, dataset=dataset), rows


def test_compare_cli_table_and_plot(tmp_path, seed, capsys):
    rng = random.Random(seed)
    paths, summaries = [], {}
    for model in ("base", "crisp"):
        for dataset in ("MATH-500", "AIME-2024"):
            summary, _ = fake_summary(rng, model, dataset)
            folder = tmp_path / model / dataset
            folder.mkdir(parents=True)
            (folder / "summary.json").write_text(json.dumps(summary))
            paths.append(str(folder))  # a run folder works as well as the file
            summaries[(model, dataset)] = summary
    plot, rows_path = tmp_path / "cmp.png", tmp_path / "cmp.json"
    assert compare_main(paths + ["--plot", str(plot), "--json", str(rows_path)]) == 0
    printed = capsys.readouterr().out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads(rows_path.read_text())
    assert len(rows) == 4
    for row in rows:
        base, mine = summaries[("base", row["dataset"])], summaries[(row["model"], row["dataset"])]
        if row["model"] == "base":
            assert row["is_base"] and row["token_reduction"] is None
        else:
            expected = 1 - mine["mean_tokens"] / base["mean_tokens"]
            assert row["token_reduction"] == pytest.approx(expected)
            assert row["accuracy_change"] == pytest.approx(mine["accuracy"] - base["accuracy"])
            assert f"{-100 * expected:+.1f}%" in printed
        assert f"{100 * mine['accuracy']:.1f}" in printed


def test_compare_with_labels_base_and_missing_base_dataset(tmp_path, seed):
    rng = random.Random(seed)
    base, _ = fake_summary(rng, "m", "MATH-500")
    other, _ = fake_summary(rng, "m", "MATH-500")
    lonely, _ = fake_summary(rng, "m", "CHAMP")
    rows = comparison_rows([base, other, lonely], ["b", "c", "c"], "b")
    assert [r["token_reduction"] is None for r in rows] == [True, False, True]  # no base run on CHAMP
    files = []
    for name, summary in (("a", base), ("b", other)):
        (tmp_path / f"{name}.json").write_text(json.dumps(summary))
        files.append(str(tmp_path / f"{name}.json"))
    # same model name twice on one dataset: ambiguous without labels
    assert compare_main(files + ["--plot", ""]) == 2
    assert compare_main(files + ["--plot", "", "--labels", "before,after", "--base", "after"]) == 0
    assert compare_main(files + ["--plot", "", "--labels", "only-one"]) == 2
    assert compare_main(files + ["--plot", "", "--labels", "x,y", "--base", "z"]) == 2


def test_compare_bad_summaries_name_the_file(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text('{"dataset": "x",\n "accuracy": }')
    assert compare_main([str(broken), str(broken)]) == 2
    assert f"{broken}:2" in capsys.readouterr().err
    not_summary = tmp_path / "other.json"
    not_summary.write_text('{"dataset": "x", "accuracy": 0.5}')
    assert compare_main([str(not_summary), str(not_summary)]) == 2
    assert "mean_tokens" in capsys.readouterr().err
    assert compare_main([str(tmp_path / "nope"), str(not_summary)]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_summary_counts_each_problem_once_whatever_its_samples(seed):
    """mean@k averages per problem: a problem with more samples does not weigh more."""
    rng = random.Random(seed)
    rows, per_problem = [], []
    for p in range(5):
        k = rng.randint(1, 6)
        verdicts = [rng.random() < 0.5 for _ in range(k)]
        per_problem.append(mean(verdicts))
        rows += [{"problem_id": p, "correct": v, "tokens": 3, "finish_reason": "stop"} for v in verdicts]
    assert summarize(rows)["accuracy"] == pytest.approx(mean(per_problem))
    with pytest.raises(ValueError, match="no samples"):
        summarize([])
