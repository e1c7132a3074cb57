"""GPU-check part: the CUDA tests (compiled Triton kernels against the float64 truth, determinism,
the memory contract measured with the CUDA allocator), counted by outcome.

    TRITON_INTERPRET=0 python -m benchmarks.gpu_check.part_tests \
        --files tests/test_cuda.py,tests/test_backends.py,tests/test_kernels.py -k "triton or cuda"

pytest runs in this process with a small plugin that counts outcomes and prints a STATE line after
every test, so a part killed at its limit still says how far it got, and one ROW line per failing
test. Files in --files that do not exist are reported and left out (the suite is being
reorganised; the check must not break on a renamed file). With pytest-xdist installed (the GPU
image has it) the tests run in --workers processes: kernel compilation is CPU-bound.

--dry-run (CPU, CI): the same files and selection are collected and counted, and only
tests/test_cuda.py is run (it skips itself without CUDA, so the skip path and the counting are
exercised); the interpreter-run kernel tests are `make test`'s job, not the dry run's.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import sys

import pytest

from benchmarks.gpu_check.runner import emit

DRY_RUN_FILE = "test_cuda.py"


class OutcomeCounter:
    """pytest plugin: outcome counts, failing tests and skip reasons, reported as they happen."""

    def __init__(self, dry_run: bool, stream):
        self.dry_run = dry_run
        self.stream = stream  # the real stdout: pytest captures sys.stdout (and fd 1) around each test
        self.counts = collections.Counter()
        self.skip_reasons = collections.Counter()
        self.selected = 0
        self.run = 0

    @pytest.hookimpl(trylast=True)  # after -k / -m have deselected theirs
    def pytest_collection_modifyitems(self, config, items):
        self.selected = len(items)
        if self.dry_run:
            keep = [item for item in items if item.nodeid.split("::")[0].endswith(DRY_RUN_FILE)]
            dropped = [item for item in items if item not in keep]
            if dropped:
                config.hook.pytest_deselected(items=dropped)
            items[:] = keep
        self.run = len(items)
        self._state()

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids):
        # under xdist the workers collect (and deselect), not this process: each sends its ids
        self.selected = self.run = max(self.selected, len(ids))
        self._state()

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and not report.passed):
            if hasattr(report, "wasxfail"):
                outcome = "xfailed" if report.skipped else "xpassed"
            elif report.skipped:
                outcome = "skipped"
                self.skip_reasons[_skip_reason(report)] += 1
            elif report.failed:
                outcome = "failed" if report.when == "call" else "errors"
            else:
                outcome = "passed"
            self.counts[outcome] += 1
            if outcome in ("failed", "errors"):
                self._failure(report)
        elif report.when == "teardown" and report.failed:
            self.counts["errors"] += 1
            self._failure(report)
        if report.when == "teardown":
            self._state()

    def pytest_collectreport(self, report):
        if report.failed:  # a test file that does not import
            self.counts["errors"] += 1
            self._failure(report)

    def _failure(self, report):
        text = getattr(report, "longreprtext", "") or str(report.longrepr)
        lines = [line for line in text.strip().splitlines() if line.strip()]
        self._emit("ROW", {"test": report.nodeid or str(getattr(report, "fspath", "")), "phase": getattr(report, "when", "collect"),
                     "message": " | ".join(lines[-3:])[-600:]})

    def summary(self) -> dict:
        return {"selected": self.selected, "run": self.run,
                **{key: self.counts.get(key, 0) for key in ("passed", "failed", "errors", "skipped", "xfailed", "xpassed")},
                "skip_reasons": dict(self.skip_reasons.most_common(5))}

    def _state(self):
        self._emit("STATE", self.summary())

    def _emit(self, tag, value):
        self.stream.write("\n")  # pytest's progress dots have no newline; a protocol line starts its own
        emit(tag, value, self.stream)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")[:200]
    return str(longrepr)[:200]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", required=True, help="comma-separated test files")
    parser.add_argument("-k", dest="keyword", default="", help="pytest -k selection")
    parser.add_argument("--workers", type=int, default=0, help="pytest-xdist workers (0: in this process)")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)

    files = [path for path in args.files.split(",") if path]
    present = [path for path in files if os.path.exists(path)]
    missing = sorted(set(files) - set(present))
    if not present:
        emit("RESULT", {"status": "failed", "reason": f"none of the test files exist: {files}"})
        return 1
    pytest_args = [*present, "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors"]
    if args.keyword:
        pytest_args += ["-k", args.keyword]
    workers = args.workers if not args.dry_run and importlib.util.find_spec("xdist") is not None else 0
    if workers > 1:
        pytest_args += ["-n", str(workers)]
    stream = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    counter = OutcomeCounter(args.dry_run, stream)
    exit_code = int(pytest.main(pytest_args, plugins=[counter]))
    summary = counter.summary()
    summary.update(exit_code=exit_code, files=present, missing_files=missing, keyword=args.keyword, workers=workers)
    problems = []
    if summary["failed"] or summary["errors"]:
        problems.append(f"{summary['failed']} failed, {summary['errors']} errors")
    if not args.dry_run and summary["passed"] == 0:
        problems.append("no test passed: on a GPU the CUDA tests must run, not skip")
    if args.dry_run and summary["selected"] == 0:
        problems.append(f"the selection -k {args.keyword!r} matched no test in {present}")
    if exit_code not in (0, 1, 5):  # 1 = some tests failed (counted above); 5 = none collected
        problems.append(f"pytest exited with {exit_code} (usage or internal error)")
    emit("RESULT", {"status": "failed" if problems else "ok", "reason": "; ".join(problems), **summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
