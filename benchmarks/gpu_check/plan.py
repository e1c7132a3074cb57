"""The parts of the GPU check, with their shapes and time budgets, for the GPU and for the dry run.

The GPU budgets add up to 420 s of the 480 s (8 minute) total, so the whole check, the wheel
install before it and the report after it end inside 8 minutes on one H200 even when every part
runs to its limit; typical runs are much shorter (the numbers below are ceilings, not estimates).
The machine is lent for 15 minutes in all, start-up included, which leaves room for one rerun.

Parts run in this order; each is a child process killed at its budget (runner.py):

  tests              CUDA tests: tests/test_cuda.py plus the Triton/CUDA selection of the kernel and
                     backend conformance suites, compiled for the real GPU (TRITON_INTERPRET=0)
  fused:<impl>       the fused loss at D = 4096, V = 151,936, N = 4k/8k/16k, bf16, one part per
                     contender (floor, crisp_fast Triton, Liger Triton, TRL chunked)
  trainer:hf         two CRISP steps on a tiny real-vocabulary Qwen3, HF generate rollouts
  trainer:vllm       the same with vLLM rollouts (skipped when vllm is not importable)

The dry run (--dry-run) runs the same parts on CPU at tiny shapes with Triton in its interpreter.
"""
from __future__ import annotations

import sys

from benchmarks.gpu_check.runner import Part

TOTAL_BUDGET_S = 480.0          # 8 minutes on the GPU, the bound
# CI: ~55 CPU seconds in all (most of it imports: torch, transformers, trl), about a minute on a
# quiet 2-core machine; the limits are ~3x that so that a busy machine does not fail CI
DRY_RUN_TOTAL_BUDGET_S = 300.0

QWEN3_8B = dict(hidden=4096, vocab=151_936, tokens=(4096, 8192, 16384))
DRY_RUN_SHAPE = dict(hidden=64, vocab=1000, tokens=(64, 96))
TEST_FILES = ("tests/test_cuda.py", "tests/test_backends.py", "tests/test_kernels.py")
TEST_SELECTION = "triton or cuda"
# the floor first: every other contender's time is read as a ratio to it
FUSED_IMPLS = ("floor:4-gemm", "crisp:triton", "liger:triton", "trl:chunked")

GPU_BUDGETS = {"tests": 150, "fused:floor:4-gemm": 25, "fused:crisp:triton": 45, "fused:liger:triton": 45,
               "fused:trl:chunked": 60, "trainer:hf": 60, "trainer:vllm": 35}
DRY_RUN_BUDGETS = {"tests": 45, "fused:floor:4-gemm": 20, "fused:crisp:triton": 30, "fused:liger:triton": 15,
                   "fused:trl:chunked": 45, "trainer:hf": 60, "trainer:vllm": 15}


def _python(module: str, *args) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def build_plan(dry_run: bool, test_workers: int = 8) -> list[Part]:
    device = "cpu" if dry_run else "cuda"
    budgets = DRY_RUN_BUDGETS if dry_run else GPU_BUDGETS
    shape = DRY_RUN_SHAPE if dry_run else QWEN3_8B
    # the interpreter on CPU, the compiler on the GPU: set before the child imports triton
    triton_env = {"TRITON_INTERPRET": "1" if dry_run else "0"}
    parts = [Part("tests", _python("benchmarks.gpu_check.part_tests", "--files", ",".join(TEST_FILES),
                                   "-k", TEST_SELECTION, "--workers", test_workers, *(["--dry-run"] if dry_run else [])),
                  budgets["tests"],
                  "pytest " + " ".join(TEST_FILES) + f" -k {TEST_SELECTION!r}"
                  + (" (collected; only test_cuda.py run, which skips on CPU)" if dry_run else f", {test_workers} workers"),
                  env=dict(triton_env))]
    tokens = ",".join(map(str, shape["tokens"]))
    for impl in FUSED_IMPLS:
        reps = 1 if dry_run else 3
        parts.append(Part(f"fused:{impl}",
                          _python("benchmarks.gpu_check.part_fused", "--impl", impl, "--tokens", tokens,
                                  "--hidden", shape["hidden"], "--vocab", shape["vocab"], "--device", device,
                                  "--dtype", "bfloat16", "--warmup", 1, "--reps", reps),
                          budgets[f"fused:{impl}"],
                          f"{impl}: D={shape['hidden']} V={shape['vocab']} N={tokens} bf16, 1 warm-up + {reps} timed",
                          env=dict(triton_env)))
    if dry_run:  # V stays the real 151,936; the loss backend is "auto" as on the GPU (there Triton,
        # here the native one: the interpreter would take ~40 CPU s at this V; part_fused runs it)
        trainer = dict(hidden=32, layers=2, dtype="float32", mixed_precision="auto", prompts=2, samples=2,
                       new_tokens=8, steps=1, loss_backend="auto")
    else:
        # fp32 master weights, bf16 compute: the trainer's FSDP2 mixed-precision path
        trainer = dict(hidden=256, layers=2, dtype="float32", mixed_precision="bf16", prompts=8, samples=4,
                       new_tokens=128, steps=2, loss_backend="auto")
    for engine in ("hf", "vllm"):
        argv = _python("benchmarks.gpu_check.part_trainer", "--engine", engine, "--device", device,
                       "--vocab", 151_936, *[item for key, value in trainer.items()
                                             for item in (f"--{key.replace('_', '-')}", value)])
        parts.append(Part(f"trainer:{engine}", argv, budgets[f"trainer:{engine}"],
                          f"{trainer['steps']} CRISP step(s), {engine} rollouts, Qwen3 V=151936 "
                          f"D={trainer['hidden']} x{trainer['layers']} layers {trainer['dtype']} "
                          f"(mixed precision {trainer['mixed_precision']}), "
                          f"{trainer['prompts']}x{trainer['samples']} rollouts of <= {trainer['new_tokens']} tokens, "
                          f"loss backend {trainer['loss_backend']}", env=dict(triton_env)))
    return parts


def format_plan(parts: list[Part], total_budget_s: float, dry_run: bool) -> str:
    width = max(len(part.name) for part in parts)
    lines = [f"gpu-check plan ({'dry run on CPU, tiny shapes' if dry_run else 'GPU'}): {len(parts)} parts, "
             f"budgets add up to {sum(p.budget_s for p in parts):.0f} s of {total_budget_s:.0f} s"]
    for part in parts:
        lines.append(f"  {part.name:{width}s}  {part.budget_s:4.0f} s  {part.what}")
    return "\n".join(lines)
