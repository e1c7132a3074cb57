"""Step metrics: DIR/metrics.jsonl (one JSON object per step), TensorBoard when installed,
W&B when asked, a progress bar, and peak memory."""
from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path

import torch


_CLEAR_REFS_WARNED = False


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    raise OSError(f"{field} not in /proc/self/status")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory since the last `reset_peak_memory`: CUDA bytes allocated, or on CPU the
    process's resident-set high-water mark (VmHWM; it includes what was resident at the reset)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        return _status_bytes("VmHWM")
    except OSError:  # no /proc (macOS): the process peak since start, which reset cannot lower
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator counter, or on Linux the RSS high-water mark (writing
    "5" to /proc/self/clear_refs sets VmHWM to the current RSS)."""
    global _CLEAR_REFS_WARNED
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError as error:
        if not _CLEAR_REFS_WARNED:
            _CLEAR_REFS_WARNED = True
            print(f"crisp: cannot reset the RSS high-water mark ({error}); peak_memory_bytes is the "
                  "process peak since start", file=sys.stderr)


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN / inf
    return value


def _format(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# what a printed line (and the progress bar) shows, when the step has it
SHOWN = ("loss", "kl", "mean_response_tokens", "accuracy", "grad_norm", "lr", "eval_accuracy", "eval_mean_tokens")


def read_kept_lines(path: Path, start_step: int) -> list[str]:
    """The lines of a metrics file up to `start_step` (a resumed run redoes the rest). A torn last
    line (a kill or a full disk mid-append) is dropped with a message; a bad line elsewhere is an
    error naming file:line."""
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    kept = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except (UnicodeDecodeError, ValueError) as error:
            if number == len(lines):
                print(f"crisp: {path}:{number}: dropped a torn last line ({len(raw)} bytes, {error.__class__.__name__}): "
                      f"the run was stopped while writing it", file=sys.stderr)
                continue
            raise ValueError(f"{path}:{number}: not a metrics line ({error}); fix or remove the file to resume") from None
        if row.get("step", 0) <= start_step:
            kept.append(raw.decode("utf-8"))
    return kept


class MetricsLogger:
    """Rank 0 writes; other ranks hold a logger that does nothing. `progress`: a tqdm bar whose
    figures are refreshed every `print_every` steps; without it, one printed line every
    `print_every` steps (0: neither)."""

    def __init__(self, out_dir: Path | None, *, enabled: bool, total_steps: int, start_step: int = 0,
                 tensorboard: str = "auto", wandb: bool = False, wandb_project: str = "crisp-fast",
                 progress: bool = True, config: dict | None = None, print_every: int = 1):
        self.enabled = enabled and out_dir is not None
        self.history: list[dict] = []
        self.writer = self.wandb = self.bar = None
        self.total_steps, self.print_every, self.progress = total_steps, print_every, progress
        if not self.enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        if start_step == 0 and self.path.exists():
            self.path.unlink()
        elif self.path.exists():  # resumed: drop lines past the checkpoint, they will be redone
            kept = read_kept_lines(self.path, start_step)
            temporary = self.path.with_name(self.path.name + ".tmp")
            temporary.write_text("".join(line + "\n" for line in kept))
            os.replace(temporary, self.path)  # a kill during the rewrite keeps the old file
        if tensorboard != "off":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                if tensorboard == "on":
                    raise
        if wandb:
            import wandb as wandb_module

            self.wandb = wandb_module.init(project=wandb_project, config=config, dir=str(out_dir))
        if progress:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total_steps, initial=start_step, desc="crisp", dynamic_ncols=True)
            except ImportError:
                pass

    def log(self, metrics: dict) -> None:
        self.history.append(metrics)
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps({k: _clean(v) for k, v in metrics.items()}) + "\n")
        step = metrics["step"]
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.writer is not None:
            for key, value in numbers.items():
                self.writer.add_scalar(f"train/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)
        due = self.print_every > 0 and (step % self.print_every == 0 or step == self.total_steps)
        shown = {key: metrics[key] for key in SHOWN if key in metrics and metrics[key] is not None}
        if self.bar is not None:
            self.bar.update(1)
            if due:
                self.bar.set_postfix({key: _format(value) for key, value in shown.items()})
        elif due:
            figures = " ".join(f"{key}={_format(value)}" for key, value in shown.items())
            print(f"crisp: step {step}/{self.total_steps} {figures}", flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
