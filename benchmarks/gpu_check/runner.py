"""One part of the GPU check in its own child process, under a hard time limit.

The child speaks a line protocol on stdout (everything else it prints is kept as its log):

    ROW {json}      one measured table row, printed as soon as it is measured
    STATE {json}    the part's summary so far (the last one wins), e.g. test counts
    RESULT {json}   the part's final summary, with "status": ok | failed | skipped (+ "reason")

The child starts a new process session, so that at its limit the whole group (pytest workers,
compiler subprocesses) is killed with SIGKILL, not just the child. Output goes to a file, not a
pipe: a killed child cannot leave the parent blocked on a full pipe, and whatever it printed
before it died is still there to read. A part that timed out or crashed keeps the ROWs and the
last STATE it printed.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

STATUSES = ("ok", "failed", "skipped", "timeout", "error")
LOG_TAIL_CHARS = 4000


@dataclass
class Part:
    """A named child command with a time budget (seconds) and a one-line description."""

    name: str
    argv: list[str]
    budget_s: float
    what: str
    env: dict = field(default_factory=dict)  # added to the parent's environment


@dataclass
class PartResult:
    name: str
    status: str                      # one of STATUSES
    seconds: float
    limit_s: float
    rows: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    reason: str = ""
    log: str = ""                    # the child's whole output
    cpu_s: float | None = None       # CPU seconds of the child (and the children it waited for)

    def as_dict(self) -> dict:
        record = {"name": self.name, "status": self.status, "seconds": round(self.seconds, 2),
                  "cpu_s": None if self.cpu_s is None else round(self.cpu_s, 2), "limit_s": self.limit_s, "rows": self.rows, "summary": self.summary, "reason": self.reason}
        if self.status not in ("ok", "skipped"):
            record["log_tail"] = self.log[-LOG_TAIL_CHARS:]
        return record


def parse_protocol(text: str) -> tuple[list[dict], dict | None, dict | None]:
    """(rows, last STATE, RESULT) from a child's output; lines that are not protocol are ignored,
    and a protocol line cut off by a kill (invalid JSON) is dropped."""
    rows, state, result = [], None, None
    for line in text.splitlines():
        tag, _, payload = line.partition(" ")
        if tag not in ("ROW", "STATE", "RESULT"):
            continue
        try:
            value = json.loads(payload)
        except json.JSONDecodeError:
            continue
        if tag == "ROW":
            rows.append(value)
        elif tag == "STATE":
            state = value
        else:
            result = value
    return rows, state, result


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def run_part(part: Part, limit_s: float, *, cwd: str, base_env: dict | None = None) -> PartResult:
    """Run `part.argv` for at most `limit_s` seconds and return what it reported."""
    env = dict(os.environ if base_env is None else base_env)
    env.update(part.env)
    env["PYTHONUNBUFFERED"] = "1"  # a killed child must have flushed every line it printed
    start = time.monotonic()
    cpu_before = _children_cpu_s()
    with tempfile.TemporaryFile(mode="w+") as output:
        process = subprocess.Popen(part.argv, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        timed_out = False
        try:
            process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        # the child's own children (pytest workers, compilers) go with it, also when it exited
        _kill_group(process)
        seconds = time.monotonic() - start
        output.seek(0)
        log = output.read()
    cpu_s = _children_cpu_s() - cpu_before
    rows, state, result = parse_protocol(log)
    if timed_out:
        return PartResult(part.name, "timeout", seconds, limit_s, rows, state or {},
                          f"killed at its {limit_s:.0f} s limit", log, cpu_s)
    if result is None:
        last = " | ".join(line for line in log.strip().splitlines()[-3:])
        return PartResult(part.name, "error", seconds, limit_s, rows, state or {},
                          f"exit {process.returncode} without a RESULT line: {last[-500:]}", log, cpu_s)
    status = result.pop("status", "ok")
    if status not in STATUSES:
        status = "error"
    if status == "ok" and process.returncode != 0:
        status = "error"
    reason = result.pop("reason", "") or (f"exit {process.returncode}" if status == "error" else "")
    return PartResult(part.name, status, seconds, limit_s, rows, result, reason, log, cpu_s)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_plan(parts: list[Part], *, total_budget_s: float, cwd: str, report_reserve_s: float = 10.0,
             on_done=None) -> list[PartResult]:
    """Run the parts in order, each under min(its budget, what is left of `total_budget_s` less
    `report_reserve_s`); a part with under 3 s left is skipped, not started. `on_done(result)`
    is called after each part (the CLI prints progress with it)."""
    start = time.monotonic()
    results = []
    for part in parts:
        left = total_budget_s - report_reserve_s - (time.monotonic() - start)
        limit = min(part.budget_s, left)
        if limit < 3:
            result = PartResult(part.name, "skipped", 0.0, part.budget_s,
                                reason=f"no time left in the {total_budget_s:.0f} s budget")
        else:
            result = run_part(part, limit, cwd=cwd)
        results.append(result)
        if on_done is not None:
            on_done(result)
    return results


def emit(tag: str, value: dict, stream=None) -> None:
    """Print one protocol line (children call this) to `stream` (default sys.stdout)."""
    assert tag in ("ROW", "STATE", "RESULT"), tag
    print(f"{tag} {json.dumps(value, default=str)}", file=stream, flush=True)
