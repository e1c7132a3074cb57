"""The contenders of the fused-loss benchmark, and the child process that times one of them.

Every implementation computes the same thing: the mean over tokens of KL(student || teacher)
from hidden states with a shared lm_head (the self-distillation case), forward and backward,
producing d(student_hidden) and d(lm_head_weight). The parent (`benchmarks/harness.py`) runs
each one in its own process so that peak memory is that implementation's alone:

    python -m benchmarks.fused_impls --impl crisp:torch --tokens 1024 --hidden 256 --vocab 151936

prints one JSON line: median time, peak memory over the inputs, the loss and gradient norms
(so the parent can check that every implementation computes the same numbers).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

NAIVE, FLOOR = "naive", "floor:4-gemm"
LIGER_CHUNKED, LIGER_TRITON, TRL = "liger:chunked", "liger:triton", "trl:chunked"
# the floor's GEMM schedule (see floor_step): it must not itself need N x V memory
FLOOR_TILE_CPU = (1024, 4096)  # tokens x vocabulary rows; the same tile for fp32 and bf16 inputs
FLOOR_CHUNK_ROWS_CUDA = 4096


def implementation_names(device: str) -> list[str]:
    """Every contender that can run on `device`, with a reason for each one left out."""
    import crisp_fast

    names, skipped = [FLOOR, NAIVE], {}
    for backend, state in crisp_fast.available_backends().items():
        if state != "ok":
            skipped[f"crisp:{backend}"] = state
        elif backend == "triton" and device == "cpu":
            skipped["crisp:triton"] = ("CPU runs Triton through its interpreter, thousands of times slower "
                                       "than compiled code: not a meaningful timing")
        else:
            names.append(f"crisp:{backend}")
    names += [LIGER_CHUNKED, TRL]
    if device == "cuda":
        names.append(LIGER_TRITON)
    else:
        skipped[LIGER_TRITON] = "Liger's Triton kernels need a GPU"
    return names, skipped


def make_inputs(tokens: int, hidden: int, vocab: int, *, device: str, dtype: torch.dtype, seed: int):
    """Student/teacher hidden states and one lm_head; logits come out with unit-ish spread and a
    teacher close to the student, as after a few steps of self-distillation."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    weight = (torch.randn(vocab, hidden, generator=generator) / hidden ** 0.5).to(device, dtype)
    student = torch.randn(tokens, hidden, generator=generator)
    teacher = student + 0.5 * torch.randn(tokens, hidden, generator=generator)
    student, teacher = student.to(device, dtype), teacher.to(device, dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=generator).to(device)
    return student.requires_grad_(), teacher, weight.requires_grad_(), labels


def naive_loss(student, teacher, weight, labels):
    """Full logits, log_softmax, KL, autograd: what the fused kernels avoid."""
    student_logp = torch.log_softmax((student @ weight.T).float(), dim=-1)
    with torch.no_grad():
        teacher_logp = torch.log_softmax((teacher @ weight.T).float(), dim=-1)
    return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1).mean()


def make_loss_fn(name: str, device: str):
    """A callable (student, teacher, weight, labels) -> scalar loss for contender `name`."""
    if name == NAIVE:
        return naive_loss
    if name.startswith("crisp:"):
        import crisp_fast

        backend = name.split(":", 1)[1]
        return lambda s, t, w, _labels: crisp_fast.fused_linear_reverse_kl(s, t, w, backend=backend)
    if name == LIGER_CHUNKED:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        # beta = 1 is KL(student || teacher); no hard (CE) term; torch.compile is not usable on CPU here
        module = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0,
                                         compiled=device != "cpu")
        return lambda s, t, w, labels: module(s, w, t, w, labels)
    if name == LIGER_TRITON:
        from liger_kernel.transformers import LigerFusedLinearJSD

        module = LigerFusedLinearJSD(jsd_beta=1.0)
        return lambda s, t, w, labels: module(s, w, t, w, labels)
    if name == TRL:
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

        # (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, beta)
        return lambda s, t, w, _labels: ChunkedDivergenceFunction.apply(s, w, None, t, w, None, 1.0)[0].mean()
    raise ValueError(f"unknown implementation {name!r}")


def floor_step(student, teacher, weight, _labels, tile=None, upcast=False):
    """The four GEMMs no implementation can avoid: student and teacher logits, dh = g W and
    dW = g^T h (2 N D V FLOPs each), scheduled the way the machine runs them fastest, so that the
    floor is its GEMM limit and not a memory-traffic artefact. On CPU that is tiles of
    FLOOR_TILE_CPU tokens x vocabulary rows whose output stays in cache (2 threads, N = 2048,
    V = 151,936: 325 GFLOP/s at D = 256 and 330 at D = 1024, against 266 and 321 for 2,048-token
    chunks over the whole vocabulary, whose 1.2-5 GB outputs go through DRAM); on CUDA, whole-
    vocabulary chunks of FLOOR_CHUNK_ROWS_CUDA tokens (few launches; the GPU keeps its own tiles).

    With bf16 inputs the same four GEMMs run in bf16: on CPU torch.mm(bf16, bf16) returns bf16
    (oneDNN accumulates each dot product in fp32 inside the call, and on AMX / AVX512-BF16 CPUs
    this is the fast path), and torch.mm's `out_dtype=torch.float32` is not supported on CPU, so
    the bf16 floor is the plain bf16 GEMM rate with bf16 outputs, dh and dW accumulated across
    tiles in bf16. A real implementation that keeps fp32 accumulators can only be slower.
    A CPU without bf16 hardware (no AVX512-BF16 / AMX) runs those bf16 GEMMs far below its fp32
    rate; there the best schedule for bf16 inputs is `upcast=True`: h and W converted to fp32
    once (timed), the fp32 tiles, the gradients cast back. run_one picks the faster of the two
    on a one-tile probe and reports which.
    `tile` = (tokens, vocabulary rows) overrides the CPU schedule (to probe a machine)."""
    tokens, vocab = student.shape[0], weight.shape[0]
    if tile is not None:
        rows, columns = tile
    else:
        rows, columns = FLOOR_TILE_CPU if weight.device.type == "cpu" else (FLOOR_CHUNK_ROWS_CUDA, vocab)
    rows, columns = min(rows, tokens), min(columns, vocab)
    with torch.no_grad():
        w, h_s, h_t = weight.detach(), student.detach(), teacher.detach()
        if upcast:
            w, h_s, h_t = w.float(), h_s.float(), h_t.float()
        buffer = torch.empty(rows, columns, device=w.device, dtype=w.dtype)
        grad_hidden = torch.zeros_like(h_s)
        grad_weight = torch.zeros_like(w)
        for start in range(0, tokens, rows):
            stop = min(start + rows, tokens)
            for first in range(0, vocab, columns):
                last = min(first + columns, vocab)
                logits = buffer[: stop - start, : last - first]
                torch.matmul(h_s[start:stop], w[first:last].T, out=logits)
                torch.matmul(h_t[start:stop], w[first:last].T, out=logits)
                grad_hidden[start:stop].addmm_(logits, w[first:last])  # `logits` stands in for g
                grad_weight[first:last].addmm_(logits.T, h_s[start:stop])
    student.grad, weight.grad = grad_hidden.to(student.dtype), grad_weight.to(weight.dtype)
    return None


def _faster_floor_schedule(hidden, vocab, *, device, dtype, seed, tile):
    """'bf16' or 'upcast': which floor schedule is faster for bf16 inputs on this CPU, timed on one
    256 x 4096 tile (the second of two runs each: a rate, so a slice of the vocabulary will do; on
    a CPU without bf16 hardware a full-size bf16 probe would take minutes)."""
    student, teacher, weight, labels = make_inputs(256, hidden, min(vocab, 4096), device=device, dtype=dtype,
                                                   seed=seed)
    best = {}
    for schedule in ("upcast", "bf16"):
        timings = []
        for _ in range(2):
            start = time.perf_counter()
            floor_step(student, teacher, weight, labels, tile=tile, upcast=schedule == "upcast")
            timings.append(time.perf_counter() - start)
        best[schedule] = timings[-1]
    return min(best, key=best.get), best


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak memory over a baseline: CUDA's allocator counter, or the process's RSS high-water
    mark on CPU (reset through /proc/self/clear_refs, so it counts from the baseline on)."""

    def __init__(self, device: str):
        self.device = device
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # 5 = reset the peak RSS (VmHWM) to the current RSS
            self.baseline = _rss_bytes("VmRSS")

    def peak_over_baseline(self) -> int:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() - self.baseline
        return _rss_bytes("VmHWM") - self.baseline


def run_one(name, tokens, hidden, vocab, *, device, dtype, warmup, reps, seed, floor_tile=None):
    """Time `reps` forward+backward passes of `name` after `warmup` ones; return the facts."""
    schedule = None
    if name == FLOOR:
        upcast = False
        if dtype == torch.bfloat16 and device == "cpu":
            schedule, probe = _faster_floor_schedule(hidden, vocab, device=device, dtype=dtype, seed=seed,
                                                     tile=floor_tile)
            upcast = schedule == "upcast"

        def step(student, teacher, weight, labels):
            return floor_step(student, teacher, weight, labels, tile=floor_tile, upcast=upcast)
    else:
        step = make_loss_fn(name, device)
    # on CPU warm up on at most 512 rows: it loads code and thread pools, and a warm-up at full
    # size would double the cost of the largest shapes; on CUDA warm up at full size, so that
    # compiled (autotuned, torch.compile'd) code is specialised to the timed shape
    warm_tokens = tokens if device == "cuda" else min(tokens, 512)
    student, teacher, weight, labels = make_inputs(warm_tokens, hidden, vocab, device=device, dtype=dtype, seed=seed)
    for _ in range(warmup):
        _run_step(step, student, teacher, weight, labels)
    del student, teacher, weight, labels
    gc.collect()

    student, teacher, weight, labels = make_inputs(tokens, hidden, vocab, device=device, dtype=dtype, seed=seed)
    gc.collect()
    memory = PeakMemory(device)
    times, loss = [], None
    for _ in range(reps):
        student.grad = weight.grad = None
        _sync(device)
        start = time.perf_counter()
        loss = _run_step(step, student, teacher, weight, labels)
        _sync(device)
        times.append(time.perf_counter() - start)
    result = {"impl": name, "tokens": tokens, "hidden": hidden, "vocab": vocab, "dtype": str(dtype).split(".")[-1],
              "times_s": times,
              "time_s": statistics.median(times), "peak_bytes": memory.peak_over_baseline(),
              "threads": torch.get_num_threads()}
    if name == FLOOR:
        flops = 4 * 2 * tokens * hidden * vocab
        result["gflops"] = flops / result["time_s"] / 1e9
        if schedule:  # bf16 inputs: which schedule won the one-tile probe, and both probe times
            result["floor_schedule"] = schedule
            result["floor_probe_s"] = probe
    else:
        result.update(loss=float(loss), grad_hidden_norm=float(student.grad.double().norm()),
                      grad_weight_norm=float(weight.grad.double().norm()))
    return result


def _run_step(step, student, teacher, weight, labels):
    loss = step(student, teacher, weight, labels)
    if loss is not None:
        loss.backward()
        return loss.detach()
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", required=True)
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--hidden", type=int, required=True)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--floor-tile", default=None, metavar="ROWSxCOLUMNS",
                        help=f"the floor's CPU tile, tokens x vocabulary rows (default "
                             f"{FLOOR_TILE_CPU[0]}x{FLOOR_TILE_CPU[1]})")
    args = parser.parse_args(argv)
    floor_tile = None
    if args.floor_tile:
        try:
            floor_tile = tuple(int(part) for part in args.floor_tile.lower().split("x"))
            assert len(floor_tile) == 2 and min(floor_tile) > 0
        except (ValueError, AssertionError):
            parser.error(f"--floor-tile {args.floor_tile!r}: expected ROWSxCOLUMNS, e.g. 1024x4096")
    try:
        result = run_one(args.impl, args.tokens, args.hidden, args.vocab, device=args.device,
                         dtype=getattr(torch, args.dtype), warmup=args.warmup, reps=args.reps, seed=args.seed,
                         floor_tile=floor_tile)
    except (torch.cuda.OutOfMemoryError, MemoryError) as error:
        result = {"impl": args.impl, "status": "OOM", "error": str(error).splitlines()[0]}
    except RuntimeError as error:
        text = str(error)
        oom = "can't allocate memory" in text or "out of memory" in text.lower()
        result = {"impl": args.impl, "status": "OOM" if oom else "error", "error": text.splitlines()[0][:500]}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
