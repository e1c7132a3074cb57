"""Why the native backend is slower at small hidden sizes: the BLAS rate of its three GEMM shapes
against the number of token rows per chunk, beside the benchmark floor's rate.

    PYTHONPATH=. python csrc/tests/bench_gemm_rows.py --d 256 --rows 50,128,512

The native forward+backward keeps 2 x rows x V fp32 logits per chunk, so the 1.5x memory cap
fixes `rows` (crisp_fast.backends.native.plan: ~50 at D = 256, ~200 at D = 1024, whatever N).
Per chunk it runs, block by block over the vocabulary (8192 columns):
  logits  [2 rows, D] x [D, block]   student and teacher stacked (2 GEMM units of 2 rows D V FLOPs)
  dh      [rows, block] x [block, D]
  dW     += [block, rows] x [rows, D]
Each GEMM repacks its W block, so a small `rows` pays the packing of all of W three times per
chunk for little arithmetic. Prints GFLOP/s per shape and the time of the four GEMMs for N tokens.
"""
import argparse
import time

import torch

from benchmarks.fused_impls import floor_step

VOCAB_BLOCK = 8192


def best_seconds(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def chunk_gemms(weight, hidden, rows):
    """The three GEMM shapes of one native chunk over the whole vocabulary, as closures."""
    vocab = weight.shape[0]
    stacked = torch.cat([hidden[:rows], hidden[:rows]])
    logits = torch.empty(2 * rows, VOCAB_BLOCK)
    grad = torch.randn(rows, VOCAB_BLOCK)
    grad_hidden = torch.zeros(rows, hidden.shape[1])
    grad_weight = torch.zeros_like(weight)
    blocks = [(v0, min(VOCAB_BLOCK, vocab - v0)) for v0 in range(0, vocab, VOCAB_BLOCK)]

    def logits_gemm():
        for v0, count in blocks:
            torch.mm(stacked, weight[v0:v0 + count].T, out=logits[:, :count])

    def dh_gemm():
        for v0, count in blocks:
            grad_hidden.addmm_(grad[:, :count], weight[v0:v0 + count])

    def dw_gemm():
        for v0, count in blocks:
            grad_weight[v0:v0 + count].addmm_(grad[:, :count].T, hidden[:rows])

    return {"logits (x2)": (logits_gemm, 2), "dh": (dh_gemm, 1), "dW": (dw_gemm, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--tokens", type=int, default=2048, help="N for the four-GEMM time")
    parser.add_argument("--rows", default="50,128,512")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weight = torch.randn(args.vocab, args.d) / args.d ** 0.5
    hidden = torch.randn(max(args.tokens, 1024), args.d)
    unit = 2 * args.d * args.vocab  # FLOPs of one GEMM unit per token row

    student = hidden[:args.tokens].clone().requires_grad_()
    floor = best_seconds(lambda: floor_step(student, hidden[:args.tokens], weight.requires_grad_(), None), args.reps)
    weight.requires_grad_(False)
    print(f"D={args.d} V={args.vocab} threads={args.threads}: floor (4 GEMMs, N={args.tokens}) {floor:.2f} s = "
          f"{4 * unit * args.tokens / floor / 1e9:.0f} GFLOP/s")
    for rows in (int(r) for r in args.rows.split(",")):
        rates, seconds = {}, 0.0
        for name, (fn, units) in chunk_gemms(weight, hidden, rows).items():
            elapsed = best_seconds(fn, args.reps)
            rates[name] = units * unit * rows / elapsed / 1e9
            seconds += elapsed * args.tokens / rows
        shown = "  ".join(f"{name} {rate:.0f}" for name, rate in rates.items())
        print(f"  rows={rows:4d}: GFLOP/s {shown}; four GEMMs for N={args.tokens}: {seconds:.2f} s "
              f"= {seconds / floor:.2f}x the floor")


if __name__ == "__main__":
    main()
