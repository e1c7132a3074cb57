"""The GPU check's own machinery (benchmarks/gpu_check): the plan and its budgets, the hard
per-part time limit (a part past its limit is killed with its children and reported, the next
part still runs), the child protocol, the tests part's counting, and the report files. The whole
dry run is CI's job (.ci/run runs `make gpu-check GPU_CHECK_ARGS=--dry-run`); here it is a slow test.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from benchmarks.gpu_check import plan, report, runner, wheels
from benchmarks.harness import REPO_ROOT

PARTS = ["tests", "fused:floor:4-gemm", "fused:crisp:triton", "fused:liger:triton", "fused:trl:chunked",
         "trainer:hf", "trainer:vllm"]


# ------------------------------------------------------------------------------------- the plan
def test_gpu_plan_fits_in_eight_minutes_with_margin():
    parts = plan.build_plan(dry_run=False)
    assert [part.name for part in parts] == PARTS
    assert plan.TOTAL_BUDGET_S == 8 * 60
    assert all(part.budget_s > 0 for part in parts)
    # every part running to its limit still leaves a minute for the install and the report
    assert sum(part.budget_s for part in parts) <= plan.TOTAL_BUDGET_S - 60


def _argument(part, flag):
    return part.argv[part.argv.index(flag) + 1]


def test_gpu_plan_shapes_and_environment():
    parts = {part.name: part for part in plan.build_plan(dry_run=False)}
    for name in PARTS[1:5]:
        part = parts[name]
        assert _argument(part, "--hidden") == "4096" and _argument(part, "--vocab") == "151936"
        assert _argument(part, "--tokens") == "4096,8192,16384"
        assert _argument(part, "--device") == "cuda" and _argument(part, "--dtype") == "bfloat16"
    assert all(part.env["TRITON_INTERPRET"] == "0" for part in parts.values())
    assert _argument(parts["trainer:hf"], "--vocab") == "151936" and _argument(parts["trainer:hf"], "--mixed-precision") == "bf16"
    assert "--dry-run" not in parts["tests"].argv


def test_dry_run_plan_is_cpu_tiny_and_interpreted():
    parts = plan.build_plan(dry_run=True)
    assert [part.name for part in parts] == PARTS
    assert sum(part.budget_s for part in parts) <= plan.DRY_RUN_TOTAL_BUDGET_S
    for part in parts:
        assert part.env["TRITON_INTERPRET"] == "1"
        if "--device" in part.argv:
            assert _argument(part, "--device") == "cpu"
        if part.name.startswith("fused:"):
            assert int(_argument(part, "--hidden")) * int(_argument(part, "--vocab")) <= 10 ** 5
    assert "--dry-run" in parts[0].argv


def test_plan_is_printed_with_each_budget():
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--plan"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for part in plan.build_plan(dry_run=False):
        line = next(line for line in done.stdout.splitlines() if line.strip().startswith(part.name + " "))
        assert f"{part.budget_s:.0f} s" in line
    assert "of 480 s" in done.stdout


def test_only_selects_parts_and_rejects_unknown_names():
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--plan", "--only", "fused:"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "4 parts" in done.stdout and "trainer:hf" not in done.stdout
    bad = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--plan", "--only", "nonsense"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "matches no part" in bad.stderr


# -------------------------------------------------------------------------- the time limit
def _python_part(name, code, budget_s=30.0):
    return runner.Part(name, [sys.executable, "-c", textwrap.dedent(code)], budget_s, "test part")


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            return any(line.startswith("State:") and "Z" in line for line in status)
    except FileNotFoundError:
        return True


def test_part_past_its_limit_is_killed_with_its_children_and_the_next_part_runs(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    sleeper = _python_part("sleeper", f"""
        import json, subprocess, sys, time
        print('ROW ' + json.dumps({{"tokens": 4096, "status": "ok"}}), flush=True)
        print('STATE ' + json.dumps({{"passed": 3}}), flush=True)
        grandchild = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
        open({str(pid_file)!r}, 'w').write(str(grandchild.pid))
        time.sleep(120)
    """, budget_s=3.0)
    after = _python_part("after", "print('RESULT {\"status\": \"ok\", \"value\": 7}')")
    start = time.monotonic()
    first, second = runner.run_plan([sleeper, after], total_budget_s=60, cwd=str(tmp_path), report_reserve_s=0)
    assert time.monotonic() - start < 30
    assert first.status == "timeout" and "3 s limit" in first.reason
    assert 2.5 < first.seconds < 20
    assert first.rows == [{"tokens": 4096, "status": "ok"}] and first.summary == {"passed": 3}
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while not _gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(grandchild), "the part's own child survived the kill"
    assert second.status == "ok" and second.summary == {"value": 7}
    assert "log_tail" in first.as_dict() and "log_tail" not in second.as_dict()


def test_total_budget_caps_the_limits_and_skips_what_does_not_fit(tmp_path):
    quick = _python_part("quick", "import time; time.sleep(1.5); print('RESULT {\"status\": \"ok\"}')", budget_s=100)
    late = _python_part("late", "print('RESULT {\"status\": \"ok\"}')", budget_s=100)
    first, second = runner.run_plan([quick, late], total_budget_s=4.2, cwd=str(tmp_path), report_reserve_s=0)
    assert first.status == "ok" and first.limit_s <= 4.2
    assert second.status == "skipped" and "no time left" in second.reason


@pytest.mark.parametrize("code, status, reason", [
    ("import sys; print('partial'); sys.exit(3)", "error", "exit 3 without a RESULT line"),
    ("print('RESULT {\"status\": \"failed\", \"reason\": \"wrong numbers\"}')", "failed", "wrong numbers"),
    ("print('RESULT {\"status\": \"skipped\", \"reason\": \"no GPU\"}')", "skipped", "no GPU"),
    ("import sys; print('RESULT {\"status\": \"ok\"}'); sys.exit(2)", "error", "exit 2"),
])
def test_child_outcomes(tmp_path, code, status, reason):
    result = runner.run_part(_python_part("child", code), 30, cwd=str(tmp_path))
    assert result.status == status and reason in result.reason


def test_protocol_ignores_other_output_and_lines_cut_off_by_a_kill():
    rows, state, result = runner.parse_protocol(
        'hello\nROW {"a": 1}\nSTATE {"n": 1}\nSTATE {"n": 2}\nROW {"b": \nRESULT {"status": "ok"}\nROWS x\n')
    assert rows == [{"a": 1}] and state == {"n": 2} and result == {"status": "ok"}


# ------------------------------------------------------------------------- the tests part
@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "xdist"])
def test_tests_part_counts_outcomes_and_reports_failures(tmp_path, workers):
    if workers and importlib.util.find_spec("xdist") is None:
        pytest.skip("pytest-xdist is not installed here (the GPU image has it)")
    test_file = tmp_path / "test_sample.py"  # -k matches module names too: keep "cuda" out of it
    test_file.write_text(textwrap.dedent("""
        import pytest
        def test_passes_cuda(): assert 1 + 1 == 2
        def test_fails_cuda(): assert 1 + 1 == 3, "planted"
        @pytest.mark.skip(reason="no device here")
        def test_skips_cuda(): pass
        def test_not_selected(): pass
    """))
    part = runner.Part("tests", [sys.executable, "-m", "benchmarks.gpu_check.part_tests", "--files",
                                 f"{test_file},{tmp_path / 'missing.py'}", "-k", "cuda", "--workers", str(workers)], 60, "")
    result = runner.run_part(part, 60, cwd=REPO_ROOT,
                             base_env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                 filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))})
    assert result.status == "failed" and "1 failed" in result.reason
    summary = result.summary
    assert summary["workers"] == workers
    assert (summary["selected"], summary["passed"], summary["failed"], summary["skipped"]) == (3, 1, 1, 1)
    assert summary["skip_reasons"] == {"no device here": 1}
    assert summary["missing_files"] == [str(tmp_path / "missing.py")]
    assert [row["test"].split("::")[-1] for row in result.rows] == ["test_fails_cuda"]
    assert "planted" in result.rows[0]["message"]


# ----------------------------------------------------------------------------- the report
def _fake_results():
    fused = {"name": "fused:x", "status": "ok", "seconds": 1.0, "limit_s": 5, "summary": {}, "reason": "", "rows": [
        dict(impl="floor:4-gemm", tokens=4096, status="ok", time_s=0.010, peak_bytes=1000, irreducible_bytes=500,
             tflops_effective=900.0),
        dict(impl="crisp:triton", tokens=4096, status="ok", time_s=0.015, peak_bytes=1500, irreducible_bytes=500,
             tflops_effective=600.0, loss=0.5, grad_hidden_norm=2.0, grad_weight_norm=4.0),
        dict(impl="liger:triton", tokens=4096, status="ok", time_s=0.030, peak_bytes=4000, irreducible_bytes=500,
             tflops_effective=300.0, loss=0.51, grad_hidden_norm=2.0, grad_weight_norm=4.4),
        dict(impl="trl:chunked", tokens=16384, status="OOM", error="out of memory"),
    ]}
    trainer = {"name": "trainer:hf", "status": "ok", "seconds": 9.0, "limit_s": 60, "reason": "",
               "summary": {"engine": "hf"}, "rows": [dict(engine="hf", step=1, loss=0.25, grad_norm=1.5, responses=32,
                                                          response_tokens=4000, peak_memory_bytes=3 * 2 ** 30,
                                                          skipped=False)]}
    tests = {"name": "tests", "status": "failed", "seconds": 50.0, "limit_s": 150, "reason": "1 failed",
             "summary": dict(selected=10, run=10, passed=8, failed=1, errors=0, skipped=1),
             "rows": [dict(test="tests/test_cuda.py::test_x", phase="call", message="assert 1 | 2")]}
    return [tests, fused, trainer]


FACTS = {"date_utc": "2026-12-01T00:00:00+00:00", "crisp_fast_commit": "abc1234", "python": "3.12.3",
         "gpu": "NVIDIA H200", "packages": {"torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0",
                                            "liger-kernel": "0.8.5", "trl": "1.16.0"}}


def test_fused_rows_ratios_and_agreement():
    rows = {row["impl"]: row for row in report.fused_rows(_fake_results())}
    assert rows["crisp:triton"]["x_floor"] == pytest.approx(1.5)
    assert rows["crisp:triton"]["x_irreducible"] == pytest.approx(3.0)
    liger = rows["liger:triton"]
    assert liger["x_floor"] == pytest.approx(3.0)
    assert liger["loss_rel_crisp"] == pytest.approx(0.02) and liger["dw_rel_crisp"] == pytest.approx(0.1)
    assert liger["agrees_with_crisp"] is False  # the planted 10% gap in |dW| is caught
    assert "x_floor" not in rows["trl:chunked"]  # an OOM row has no ratios


def test_report_files_hold_the_tables(tmp_path):
    results = _fake_results()
    json_path, md_path = report.write_report(str(tmp_path / "out"), results, FACTS, dry_run=False, plan=[])
    record = json.loads(open(json_path).read())
    assert record["machine"]["gpu"] == "NVIDIA H200" and len(record["fused_loss"]) == 4
    assert record["trainer"][0]["peak_gib"] == pytest.approx(3.0)
    markdown = open(md_path).read()
    for heading in ("## Parts", "## CUDA tests", "## Failing tests", "## Fused loss", "## CRISP trainer steps"):
        assert heading in markdown
    assert "| crisp:triton | 4096 | ok | 15.0 | 1.50 |" in markdown
    assert "assert 1 / 2" in markdown  # a '|' inside a cell must not break the table
    text = report.text_report(results, FACTS)
    assert "NVIDIA H200" in text and "liger:triton" in text and "OOM" in text


def test_machine_facts_name_the_versions():
    facts = report.machine_facts(REPO_ROOT)
    for package in ("torch", "triton", "transformers", "liger-kernel", "trl"):
        assert package in facts["packages"]
    assert "cuda_available" in facts and "nvidia_smi" in facts


# ----------------------------------------------------------------------------- the wheels
def test_wheel_list_is_pinned_and_pure_python_sized():
    names = [name for name, _, _ in wheels.WHEELS]
    assert len(set(names)) == len(names)
    assert {"liger-kernel", "trl"} <= set(names)
    assert all(version and version[0].isdigit() and "*" not in version for _, version, _ in wheels.WHEELS)
    command = wheels.download_command("trl", "1.16.0", ".whl")
    for flag in ("--no-deps", "--only-binary=:all:", "3.12", "manylinux2014_x86_64", "trl==1.16.0"):
        assert flag in command
    assert wheels.wheel_distribution("liger_kernel-0.8.5-py3-none-any.whl") == "liger-kernel"


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    statuses = {part["name"]: part["status"] for part in record["parts"]}
    assert statuses["fused:liger:triton"] == "skipped" and statuses["fused:crisp:triton"] == "ok"
