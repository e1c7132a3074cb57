"""GPU-check part: one contender of the fused loss at a Qwen3-8B shape, every N in one process.

    python -m benchmarks.gpu_check.part_fused --impl crisp:triton --tokens 4096,8192,16384 \
        --hidden 4096 --vocab 151936 --device cuda

What is timed is what benchmarks/fused_impls.py times (and its loss functions are reused): the
mean over N tokens of KL(student || teacher) from hidden states and one shared lm_head, forward
and backward, producing dh and dW; `floor:4-gemm` is the four GEMMs alone. Inputs are drawn on
the device from a seeded generator, so every contender (each in its own process) gets the same
numbers. Per N: one warm-up pass at full size (compiles and specialises the kernels), then `reps`
passes timed with CUDA events (wall clock on CPU); peak memory is the CUDA allocator's
max_memory_allocated over the inputs (gradients included). One ROW line per N, printed as soon as
it is measured, so a part killed at its limit keeps the sizes it finished.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

from benchmarks.gpu_check.runner import emit


def recompute_flops(tokens: int, hidden: int, vocab: int) -> int:
    """12 N D V: forward (student and teacher logits) and the recompute backward (both logits
    again, dh and dW), 2 N D V each."""
    return 12 * tokens * hidden * vocab


def make_inputs(tokens, hidden, vocab, *, device, dtype, seed):
    """Student/teacher hidden states and one lm_head (logits of unit-ish spread, teacher close to
    the student), drawn on `device` so that the Qwen3-8B head does not go through the CPU."""
    import torch

    generator = torch.Generator(device=device).manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=generator, device=device).div_(hidden ** 0.5)
    student = torch.randn(tokens, hidden, generator=generator, device=device)
    teacher = student + 0.5 * torch.randn(tokens, hidden, generator=generator, device=device)
    return student.to(dtype).requires_grad_(), teacher.to(dtype), weight.to(dtype).requires_grad_()


class Timer:
    """CUDA events on CUDA (what the GPU spent, launch gaps included), wall clock on CPU."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device == "cuda"

    def time(self, fn) -> float:
        if self.cuda:
            start, end = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin


def measure(name, tokens, hidden, vocab, *, device, dtype, warmup, reps, seed) -> dict:
    import torch

    from benchmarks import fused_impls

    student, teacher, weight = make_inputs(tokens, hidden, vocab, device=device, dtype=dtype, seed=seed)
    # labels only matter to a hard-label (CE) term, which no contender here has; drawn anyway
    labels = torch.randint(0, vocab, (tokens,), device=device)
    if name == fused_impls.FLOOR:
        step = fused_impls.floor_step
    else:
        step = fused_impls.make_loss_fn(name, device)
    outcome = {}

    def one_pass():
        student.grad = weight.grad = None
        loss = step(student, teacher, weight, labels)
        if loss is not None:
            loss.backward()
            outcome["loss"] = loss.detach()

    for _ in range(warmup):
        one_pass()
    student.grad = weight.grad = None
    outcome.clear()
    gc.collect()
    memory = fused_impls.PeakMemory(device)
    timer = Timer(device)
    times = [timer.time(one_pass) for _ in range(reps)]
    row = {"impl": name, "tokens": tokens, "hidden": hidden, "vocab": vocab, "dtype": str(dtype).split(".")[-1],
           "status": "ok", "times_s": times, "time_s": statistics.median(times),
           "peak_bytes": memory.peak_over_baseline(),
           "irreducible_bytes": (vocab * hidden + tokens * hidden) * weight.element_size()}
    row["tflops_effective"] = recompute_flops(tokens, hidden, vocab) / row["time_s"] / 1e12
    if name != fused_impls.FLOOR:
        row.update(loss=float(outcome["loss"]), grad_hidden_norm=float(student.grad.double().norm()),
                   grad_weight_norm=float(weight.grad.double().norm()))
        if not all(map(_finite, (row["loss"], row["grad_hidden_norm"], row["grad_weight_norm"]))):
            row["status"] = "non-finite"
    del student, teacher, weight
    return row


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def unavailable_reason(name: str, device: str) -> str | None:
    """Why `name` cannot run on `device` here (a skip), or None."""
    if name == "liger:triton" and device != "cuda":
        return "Liger's Triton LigerFusedLinearJSD needs a CUDA GPU (its kernels are not run in the interpreter)"
    if name == "crisp:triton" and device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "crisp:triton on CPU needs TRITON_INTERPRET=1"
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", required=True)
    parser.add_argument("--tokens", required=True, help="comma-separated N, measured in this order")
    parser.add_argument("--hidden", type=int, required=True)
    parser.add_argument("--vocab", type=int, required=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), required=True)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    reason = unavailable_reason(args.impl, args.device)
    if reason:
        emit("RESULT", {"status": "skipped", "reason": reason})
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        emit("RESULT", {"status": "failed", "reason": "--device cuda but torch sees no CUDA device"})
        return 1
    from benchmarks import fused_impls

    try:  # an import failure (a wheel not carried, a version gap) fails the part with its reason
        fused_impls.make_loss_fn(args.impl, args.device) if args.impl != fused_impls.FLOOR else None
    except ImportError as error:
        emit("RESULT", {"status": "failed", "reason": f"{args.impl}: import failed: {error}"})
        return 1

    dtype = getattr(torch, args.dtype)
    bad = []
    for tokens in [int(item) for item in args.tokens.split(",") if item.strip()]:
        try:
            row = measure(args.impl, tokens, args.hidden, args.vocab, device=args.device, dtype=dtype,
                          warmup=args.warmup, reps=args.reps, seed=args.seed)
        except torch.cuda.OutOfMemoryError as error:
            row = {"impl": args.impl, "tokens": tokens, "hidden": args.hidden, "vocab": args.vocab,
                   "status": "OOM", "error": str(error).splitlines()[0][:300]}
        except Exception as error:  # noqa: BLE001 - a contender's failure is a result, the next N still runs
            row = {"impl": args.impl, "tokens": tokens, "hidden": args.hidden, "vocab": args.vocab,
                   "status": "error", "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
        emit("ROW", row)
        if row["status"] not in ("ok", "OOM"):
            bad.append(f"N={tokens}: {row['status']} {row.get('error', '')}".strip())
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    emit("RESULT", {"status": "failed" if bad else "ok", "reason": "; ".join(bad)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
