"""The GPU check's report: machine facts (versions, nvidia-smi), the tables, gpu_check.json and
gpu_check.md. The parent process never imports torch (a CUDA context there would hold GPU memory
for the whole check): torch's facts come from a short child process."""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata

from benchmarks.harness import format_table

GIB = 1024 ** 3
PACKAGES = ("torch", "triton", "transformers", "liger-kernel", "trl", "peft", "datasets", "accelerate",
            "huggingface-hub", "tokenizers", "numpy", "pyarrow", "pytest", "pytest-xdist", "vllm")
AGREEMENT_TOLERANCE = 3e-2  # bf16, relative, as in benchmarks/test_fused_loss.py
TORCH_FACTS = r"""
import json, torch
facts = {"torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    facts.update(gpu=p.name, capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                 gpu_memory_gib=round(p.total_memory / 2**30, 1), device_count=torch.cuda.device_count())
print("FACTS " + json.dumps(facts))
"""


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _run(argv: list[str], timeout: float) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unavailable: {error}"
    return done.stdout if done.returncode == 0 else f"exit {done.returncode}: {done.stderr.strip()[-300:]}"


def nvidia_smi_facts() -> dict:
    if shutil.which("nvidia-smi") is None:
        return {"nvidia_smi": "not found (no NVIDIA driver on this machine)"}
    fields = "name,driver_version,memory.total,clocks.max.sm,clocks.sm,clocks.mem,power.limit,temperature.gpu,pstate"
    query = _run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], 30) or ""
    header = _run(["nvidia-smi"], 30) or ""
    facts = {"nvidia_smi_query": fields, "nvidia_smi": query.strip()}
    for token in header.split("|"):
        if "CUDA Version" in token:
            facts["driver_cuda_version"] = token.split("CUDA Version:")[-1].strip()
    return facts


def machine_facts(repo_root: str) -> dict:
    facts = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "python": platform.python_version(), "python_executable": sys.executable,
             "cpu_count": os.cpu_count(), "machine": platform.machine()}
    facts["packages"] = {package: _version(package) for package in PACKAGES}
    commit = _run(["git", "-C", repo_root, "rev-parse", "--short", "HEAD"], 10)
    facts["crisp_fast_commit"] = commit.strip() if commit and not commit.startswith(("exit", "unavailable")) else "unknown"
    torch_facts = _run([sys.executable, "-c", TORCH_FACTS], 60) or ""
    line = next((item for item in torch_facts.splitlines() if item.startswith("FACTS ")), None)
    facts.update(json.loads(line[len("FACTS "):]) if line else {"torch_facts": torch_facts.strip()[-300:]})
    facts.update(nvidia_smi_facts())
    return facts


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------
PART_COLUMNS = [("part", "name", ""), ("status", "status", ""), ("seconds", "seconds", "{:.1f}"),
                ("CPU s", "cpu_s", "{:.1f}"), ("limit s", "limit_s", "{:.0f}"), ("reason", "reason", "")]
TEST_COLUMNS = [("selected", "selected", "{}"), ("run", "run", "{}"), ("passed", "passed", "{}"),
                ("failed", "failed", "{}"), ("errors", "errors", "{}"), ("skipped", "skipped", "{}")]
FAILURE_COLUMNS = [("test", "test", ""), ("phase", "phase", ""), ("message", "message", "")]
FUSED_COLUMNS = [("impl", "impl", ""), ("N", "tokens", "{}"), ("status", "status", ""), ("ms", "time_ms", "{:.1f}"),
                 ("x floor", "x_floor", "{:.2f}"), ("TFLOP/s (12NDV)", "tflops_effective", "{:.0f}"),
                 ("peak GiB", "peak_gib", "{:.2f}"), ("x (dW+dh)", "x_irreducible", "{:.2f}"),
                 ("loss", "loss", "{:.5f}"), ("loss vs crisp", "loss_rel_crisp", "{:.1e}"),
                 ("dh vs crisp", "dh_rel_crisp", "{:.1e}"), ("dW vs crisp", "dw_rel_crisp", "{:.1e}")]
TRAINER_COLUMNS = [("engine", "engine", ""), ("step", "step", "{}"), ("loss", "loss", "{:.4f}"),
                   ("grad norm", "grad_norm", "{:.3f}"), ("responses", "responses", "{}"),
                   ("tokens", "response_tokens", "{}"), ("rollout s", "rollout_seconds", "{:.2f}"),
                   ("train s", "train_seconds", "{:.2f}"), ("train tok/s", "train_tokens_per_second", "{:.0f}"),
                   ("peak GiB", "peak_gib", "{:.2f}"), ("skipped", "skipped", "")]


def _relative(value, truth):
    if value is None or truth is None:
        return None
    return abs(value - truth) / max(abs(truth), 1e-30)


def fused_rows(results: list[dict]) -> list[dict]:
    """Every fused-loss row, with its ratio to the floor at the same N and its agreement with
    crisp_fast's numbers (loss and gradient norms) at the same N."""
    rows = [dict(row) for result in results if result["name"].startswith("fused:") for row in result["rows"]]
    floor = {row["tokens"]: row["time_s"] for row in rows if row["impl"] == "floor:4-gemm" and row["status"] == "ok"}
    crisp = {row["tokens"]: row for row in rows if row["impl"] == "crisp:triton" and row["status"] == "ok"}
    for row in rows:
        if row.get("status") != "ok":
            continue
        row["time_ms"] = row["time_s"] * 1e3
        row["peak_gib"] = row["peak_bytes"] / GIB
        row["x_irreducible"] = row["peak_bytes"] / row["irreducible_bytes"]
        if row["tokens"] in floor:
            row["x_floor"] = row["time_s"] / floor[row["tokens"]]
        reference = crisp.get(row["tokens"])
        if reference is not None and row["impl"] not in ("crisp:triton", "floor:4-gemm"):
            row["loss_rel_crisp"] = _relative(row.get("loss"), reference.get("loss"))
            row["dh_rel_crisp"] = _relative(row.get("grad_hidden_norm"), reference.get("grad_hidden_norm"))
            row["dw_rel_crisp"] = _relative(row.get("grad_weight_norm"), reference.get("grad_weight_norm"))
            spread = [row[key] for key in ("loss_rel_crisp", "dh_rel_crisp", "dw_rel_crisp") if row[key] is not None]
            row["agrees_with_crisp"] = bool(spread) and max(spread) < AGREEMENT_TOLERANCE
    return rows


def trainer_rows(results: list[dict]) -> list[dict]:
    rows = [dict(row) for result in results if result["name"].startswith("trainer:") for row in result["rows"]]
    for row in rows:
        if row.get("peak_memory_bytes") is not None:
            row["peak_gib"] = row["peak_memory_bytes"] / GIB
    return rows


def _markdown(rows: list[dict], columns) -> str:
    if not rows:
        return "(none)\n"
    lines = ["| " + " | ".join(header for header, _, _ in columns) + " |",
             "|" + "|".join("---:" if fmt else "---" for _, _, fmt in columns) + "|"]
    for row in rows:
        cells = []
        for _, key, fmt in columns:
            value = row.get(key)
            text = "-" if value is None else (fmt.format(value) if fmt else str(value))
            cells.append(text.replace("|", "/").replace("\n", " "))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sections(results: list[dict]) -> list[tuple[str, list[dict], list]]:
    """(title, rows, columns) of every table, in report order."""
    tests = next((result for result in results if result["name"] == "tests"), None)
    out = [("Parts", results, PART_COLUMNS)]
    if tests is not None:
        out.append(("CUDA tests", [tests["summary"]] if tests["summary"] else [], TEST_COLUMNS))
        out.append(("Failing tests", tests["rows"], FAILURE_COLUMNS))
    out.append(("Fused loss (forward + backward, median of the timed passes)", fused_rows(results), FUSED_COLUMNS))
    out.append(("CRISP trainer steps", trainer_rows(results), TRAINER_COLUMNS))
    return out


def text_report(results: list[dict], facts: dict) -> str:
    parts = [f"gpu-check on {facts.get('gpu', 'CPU (no CUDA)')}, python {facts['python']}, "
             + ", ".join(f"{name} {facts['packages'][name]}" for name in ("torch", "triton", "transformers",
                                                                        "liger-kernel", "trl"))]
    for title, rows, columns in sections(results):
        parts.append(f"\n{title}\n" + (format_table(rows, columns) if rows else "(none)"))
    return "\n".join(parts)


def markdown_report(results: list[dict], facts: dict, *, dry_run: bool) -> str:
    lines = [f"# GPU check{' (dry run on CPU: tiny shapes, not a measurement)' if dry_run else ''}", "",
             f"{facts['date_utc']}, crisp-fast {facts['crisp_fast_commit']}.", "", "## Machine", ""]
    for key in ("gpu", "capability", "multiprocessors", "gpu_memory_gib", "torch_cuda", "driver_cuda_version",
                "nvidia_smi", "python", "cpu_count"):
        if key in facts:
            lines.append(f"* {key}: {facts[key]}")
    if "nvidia_smi_query" in facts:
        lines.append(f"* nvidia-smi fields: {facts['nvidia_smi_query']}")
    lines.append("* packages: " + ", ".join(f"{name} {version}" for name, version in facts["packages"].items()))
    for title, rows, columns in sections(results):
        lines += ["", f"## {title}", "", _markdown(rows, columns).rstrip()]
    return "\n".join(lines) + "\n"


def write_report(out_dir: str, results: list[dict], facts: dict, *, dry_run: bool, plan: list[dict]) -> tuple[str, str]:
    """gpu_check.json (everything) and gpu_check.md (the tables) in `out_dir`; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    record = {"benchmark": "gpu_check", "dry_run": dry_run, "machine": facts, "plan": plan, "parts": results,
              "fused_loss": fused_rows(results), "trainer": trainer_rows(results)}
    json_path, md_path = os.path.join(out_dir, "gpu_check.json"), os.path.join(out_dir, "gpu_check.md")
    for path, text in ((json_path, json.dumps(record, indent=1, default=str)),
                       (md_path, markdown_report(results, facts, dry_run=dry_run))):
        with open(path + ".tmp", "w") as handle:
            handle.write(text)
        os.replace(path + ".tmp", path)
    return json_path, md_path
