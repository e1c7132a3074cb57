"""Benchmark plumbing: child processes under a memory watchdog, machine facts, table, JSON, plot.

Each measurement runs in its own Python process (`python -m benchmarks.<module> ...`) that prints
one line `RESULT {json}`. On CPU a watchdog thread polls the child's resident memory and kills it
above a cap, so an implementation that does not fit is reported as "OOM" instead of pushing the
machine into swap or the kernel's OOM killer (RLIMIT_AS does not work with torch's allocator,
which reserves address space it never touches).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")
GIB = 1024 ** 3
MIB = 1024 ** 2


# --------------------------------------------------------------------------------------------
# memory cap and child processes
# --------------------------------------------------------------------------------------------
def meminfo_bytes(field: str) -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/meminfo")


def default_memory_cap(requested_gib: float | None) -> int:
    """The requested cap, never more than what the machine has free now minus 1.5 GiB of slack
    (the machine may be shared; a benchmark must not take it down)."""
    free = meminfo_bytes("MemAvailable") - int(1.5 * GIB)
    cap = free if requested_gib is None else min(free, int(requested_gib * GIB))
    return max(cap, GIB)


def _child_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def run_child(module: str, args: list[str], *, memory_cap: int | None, timeout_s: float) -> dict:
    """Run `python -m <module> <args>` and return its RESULT dict; {"status": "OOM"} when the
    watchdog killed it above `memory_cap` bytes of RSS, {"status": "timeout"} past `timeout_s`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    verdict = {"killed": None, "max_rss": 0}

    def watchdog():
        deadline = time.monotonic() + timeout_s
        while process.poll() is None:
            rss = _child_rss(process.pid)
            verdict["max_rss"] = max(verdict["max_rss"], rss)
            if memory_cap is not None and rss > memory_cap:
                verdict["killed"] = "OOM"
            elif time.monotonic() > deadline:
                verdict["killed"] = "timeout"
            if verdict["killed"]:
                process.send_signal(signal.SIGKILL)
                return
            time.sleep(0.005)

    thread = threading.Thread(target=watchdog, daemon=True)
    thread.start()
    stdout, stderr = process.communicate()
    thread.join()
    if verdict["killed"] == "OOM":
        return {"status": "OOM", "error": f"RSS above the {memory_cap / GIB:.1f} GiB cap"}
    if verdict["killed"] == "timeout":
        return {"status": "timeout", "error": f"no result within {timeout_s:.0f} s"}
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result.setdefault("status", "ok")
            return result
    # killed by the kernel's OOM killer, or crashed: say which, with the tail of stderr
    tail = " | ".join(stderr.strip().splitlines()[-3:])
    status = "OOM" if process.returncode == -signal.SIGKILL else "error"
    return {"status": status, "error": f"exit {process.returncode}: {tail[:500]}"}


# --------------------------------------------------------------------------------------------
# facts, tables, files
# --------------------------------------------------------------------------------------------
def machine_facts(device: str) -> dict:
    """What a reader needs to compare two runs: CPU, threads, versions, accelerator."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    facts = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
             "memory_total_gib": round(meminfo_bytes("MemTotal") / GIB, 1),
             "python": platform.python_version(), "torch": torch.__version__,
             "device": "cpu" if device == "cpu" else torch.cuda.get_device_name()}
    for package in ("triton", "liger_kernel", "trl", "transformers"):
        try:
            from importlib.metadata import version

            facts[package] = version(package.replace("_", "-"))
        except Exception:  # noqa: BLE001 - a missing package is a fact too
            facts[package] = "not installed"
    return facts


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """rows of dicts -> aligned text; columns are (header, key, format) and missing values print '-'."""
    cells = [[header for header, _, _ in columns]]
    for row in rows:
        line = []
        for _, key, fmt in columns:
            value = row.get(key)
            line.append("-" if value is None else (fmt.format(value) if fmt else str(value)))
        cells.append(line)
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    numeric = [bool(fmt) for _, _, fmt in columns]  # numbers right-aligned, words left-aligned
    text = ["  ".join(cell.rjust(width) if numeric[i] else cell.ljust(width)
                      for i, (cell, width) in enumerate(zip(line, widths))).rstrip()
            for line in cells]
    text.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(text)


def append_json(filename: str, record: dict) -> str:
    """Append `record` to the JSON list in benchmarks/results/<filename>; returns the path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, filename)
    runs = []
    if os.path.exists(path):
        with open(path) as existing:
            try:
                runs = json.load(existing)
            except json.JSONDecodeError:
                runs = []
    runs.append(record)
    with open(path + ".tmp", "w") as out:
        json.dump(runs, out, indent=1)
    os.replace(path + ".tmp", path)
    return path


def machine_line(facts: dict) -> str:
    """One line naming where the numbers come from, for plots: a figure travels without its JSON."""
    where = facts["device"] if facts["device"] != "cpu" else f"CPU: {facts['cpu']}"
    return (f"measured on {where}, {facts['torch_threads']} torch threads, torch {facts['torch']}, "
            f"{facts['date_utc'][:10]}")


def plot_sweep(rows: list[dict], path: str, title: str, subtitle: str = "") -> str | None:
    """Time and peak memory vs N, one line per implementation, one row of panels per (input dtype,
    hidden size); the 4-GEMM floor of that dtype and the irreducible memory as dashed lines;
    `subtitle` says where it was measured."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels_of = sorted({(row.get("dtype", "float32"), row["hidden"]) for row in rows},
                       key=lambda key: (key[0] != "float32", key[0], key[1]))
    figure, axes = plt.subplots(len(panels_of), 2, figsize=(12, 4.2 * len(panels_of)), squeeze=False)
    impls = list(dict.fromkeys(row["impl"] for row in rows))
    # one colour per implementation in every panel (the floor has no memory line)
    colours = {impl: f"C{index}" for index, impl in enumerate(i for i in impls if not i.startswith("floor"))}
    for panel, (dtype, hidden) in zip(axes, panels_of):
        here = [row for row in rows if row.get("dtype", "float32") == dtype and row["hidden"] == hidden]
        for impl in impls:
            points = sorted((row["tokens"], row) for row in here if row["impl"] == impl and row.get("status") == "ok")
            if not points:
                continue
            tokens = [n for n, _ in points]
            style = dict(linestyle="--", marker="x", color="black") if impl.startswith("floor") else dict(marker="o", color=colours[impl])
            panel[0].plot(tokens, [row["time_s"] for _, row in points], label=impl, **style)
            if not impl.startswith("floor"):
                panel[1].plot(tokens, [row["peak_bytes"] / MIB for _, row in points], label=impl, **style)
            ooms = sorted(row["tokens"] for row in here if row["impl"] == impl and row.get("status") == "OOM")
            if ooms:
                panel[1].annotate(f"{impl}: OOM at N={ooms[0]}", xy=(ooms[0], 1), xycoords=("data", "axes fraction"),
                                  fontsize=7, rotation=90, va="top")
        irreducible = sorted({(row["tokens"], row["irreducible_bytes"]) for row in here})
        panel[1].plot([n for n, _ in irreducible], [b / MIB for _, b in irreducible], linestyle="--", color="black",
                      label="irreducible (dW + dh)")
        for ax, ylabel in zip(panel, ("median time, forward+backward (s)", "peak memory over inputs (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens N")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{title}, {dtype} inputs, D = {hidden}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    if subtitle:
        figure.suptitle(subtitle, fontsize=9)
    figure.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
