"""Tests for crisp_fast.eval.problems: local JSONL / JSON / parquet files in the MATH-500 and
AIME formats, field names found or given, CHAMP from its package, and bad input naming the
file and line. Budget: ~10 s (no network: hub names are only tried when nothing local matches).

    PYTHONPATH=. pytest tests/test_eval_problems.py -q
"""
import json
import random

import pytest

from crisp_fast.eval.problems import DataError, FieldNames, champ_answers, load_champ, load_problems


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def math500_rows(rng, n):
    subjects = ["Algebra", "Geometry", "Number Theory"]
    return [{"problem": f"Compute {i} * {i}.", "solution": f"It is \\boxed{{{i * i}}}.", "answer": str(i * i),
             "subject": rng.choice(subjects), "level": rng.randint(1, 5), "unique_id": f"test/x/{i}.json"}
            for i in range(n)]


def test_math500_format_jsonl(tmp_path, seed):
    rng = random.Random(seed)
    rows = math500_rows(rng, rng.randint(3, 9))
    write_jsonl(tmp_path / "math500.jsonl", rows)
    name, problems = load_problems(str(tmp_path / "math500.jsonl"))
    assert name == "math500"
    assert [p.problem_id for p in problems] == [r["unique_id"] for r in rows]
    assert [p.answers for p in problems] == [[r["answer"]] for r in rows]
    assert [(p.subset, p.level) for p in problems] == [(r["subject"], str(r["level"])) for r in rows]
    _, first_two = load_problems(str(tmp_path / "math500.jsonl"), limit=2)
    assert len(first_two) == 2


def test_aime_formats_json_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    aime24 = [{"id": 60 + i, "problem": f"AIME problem {i}", "solution": "...", "answer": 100 + i,
               "url": "https://example", "year": 2024} for i in range(4)]
    (tmp_path / "aime24.json").write_text(json.dumps(aime24))
    _, problems = load_problems(str(tmp_path / "aime24.json"))
    assert [p.answer for p in problems] == ["100", "101", "102", "103"]  # integer answers become text
    assert [p.problem_id for p in problems] == ["60", "61", "62", "63"]
    aime25 = {"question": [f"Q{i}" for i in range(3)], "answer": ["70", "588", "16"]}
    pq.write_table(pa.table(aime25), tmp_path / "aime25.parquet")
    _, problems = load_problems(str(tmp_path / "aime25.parquet"))
    assert [(p.problem_id, p.problem, p.answer) for p in problems] == [("0", "Q0", "70"), ("1", "Q1", "588"),
                                                                      ("2", "Q2", "16")]


def test_original_math_format_takes_the_solutions_last_box(tmp_path):
    write_jsonl(tmp_path / "math.jsonl", [{"problem": "p", "solution": "so \\boxed{1} no, \\boxed{\\frac{1}{2}}.",
                                           "type": "Algebra", "level": "Level 3"}])
    _, (problem,) = load_problems(str(tmp_path / "math.jsonl"))
    assert problem.answers == ["\\frac{1}{2}"] and problem.subset == "Algebra" and problem.level == "Level 3"


def test_named_fields(tmp_path):
    write_jsonl(tmp_path / "custom.jsonl", [{"q": "1+1", "gold": ["2", "two"], "key": "a", "topic": "t"}])
    fields = FieldNames(problem="q", answer="gold", problem_id="key", subset="topic")
    _, (problem,) = load_problems(str(tmp_path / "custom.jsonl"), fields=fields)
    assert (problem.problem, problem.answers, problem.problem_id, problem.subset) == ("1+1", ["2", "two"], "a", "t")


@pytest.mark.parametrize("lines,line,message", [
    (['{"problem": "a", "answer": "1"}', '{"question": "b"}'], 2, "no answer field"),
    (['{"answer": "1"}'], 1, "no problem field"),
    (['{"problem": "a", "answer": "1"}', "", '{"problem": "b", "answer": "2",}'], 3, "not valid JSON"),
    (['"just a string"'], 1, "expected a JSON object"),
    (['{"problem": "", "answer": "1"}'], 1, "problem is empty"),
    (['{"problem": "a", "answer": []}'], 1, "answer list is empty"),
    (['{"problem": "a", "answer": {"x": 1}}'], 1, "must be text"),
    (['{"problem": "a", "answer": true}'], 1, "must be text"),
])
def test_bad_rows_name_file_and_line(tmp_path, lines, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as error:
        load_problems(str(path))
    assert f"{path}:{line}" in str(error.value) and message in str(error.value)


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_problems(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="is a directory"):
        load_problems(str(tmp_path))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="broken.parquet: cannot read as parquet"):
        load_problems(str(tmp_path / "broken.parquet"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no problems"):
        load_problems(str(tmp_path / "empty.jsonl"))
    write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, "problem": "a", "answer": "1"}, {"id": 1, "problem": "b", "answer": "2"}])
    with pytest.raises(DataError, match="appears twice"):
        load_problems(str(tmp_path / "dup.jsonl"))
    write_jsonl(tmp_path / "x.jsonl", [{"problem": "a", "answer": "1"}])
    with pytest.raises(DataError, match="'answer_text'"):
        load_problems(str(tmp_path / "x.jsonl"), fields=FieldNames(answer="answer_text"))
    with pytest.raises(DataError, match="limit"):
        load_problems(str(tmp_path / "x.jsonl"), limit=0)
    (tmp_path / "obj.json").write_text('{"meta": 1}')
    with pytest.raises(DataError, match="expected a list"):
        load_problems(str(tmp_path / "obj.json"))


def test_champ_offline():
    import champ_dataset

    name, problems = load_problems("champ")
    raw = champ_dataset.load("v0").problems
    assert name == "CHAMP" and len(problems) == len(raw) == 270
    assert {p.subset for p in problems} == {item.category for item in raw.values()}
    for problem in problems:
        assert problem.problem == raw[problem.problem_id].text
        assert all(answer.strip() for answer in problem.answers)


def test_champ_answer_alternatives():
    assert champ_answers("C(10, 5), or equivalently 252") == ["C(10, 5)", "252"]
    assert champ_answers("0 (i.e., no real-valued zeros)") == ["0"]
    assert champ_answers("The limit exists and is equal to (a+3b)/2") == [
        "The limit exists and is equal to (a+3b)/2", "(a+3b)/2"]
    assert champ_answers("3 is the only possible value") == ["3 is the only possible value", "3"]
    # prose that is not math gets no made-up alternative
    assert champ_answers("The sequence is not periodic") == ["The sequence is not periodic"]
    assert champ_answers("239") == ["239"]
    assert champ_answers("sum_(i=1)^n i^2, or equivalently n(n+1)(2n+1)/6") == [
        "\\sum_{i=1}^{n} i^2", "n(n+1)(2n+1)/6"]
    assert len(load_champ()) == 270
