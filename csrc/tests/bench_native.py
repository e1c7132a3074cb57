"""Time and memory of the native backend's forward+backward against the 4-GEMM floor, interleaved
in one process (the machine is shared: medians of several repetitions).

    PYTHONPATH=. python csrc/tests/bench_native.py --n 2048 --d 256 [--vocab 151936] [--reps 3]

Floor = the benchmark's floor (benchmarks/fused_impls.py: the four fp32 GEMMs of 2 N D V FLOPs,
student logits, teacher logits, G W, G^T h, in cache-sized tiles). Peak memory is VmHWM over the inputs (reset through /proc/self/clear_refs).
"""
import argparse
import statistics
import time

import torch

import crisp_fast
from benchmarks.fused_impls import floor_step


def vm_kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))


def reset_peak():
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def ours(h_s, h_t, weight):
    h_s.grad = weight.grad = None
    loss = crisp_fast.fused_linear_divergence(h_s, h_t, weight, backend="native")
    loss.backward()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    h_s = torch.randn(args.n, args.d).requires_grad_()
    h_t = torch.randn(args.n, args.d)
    weight = (torch.randn(args.vocab, args.d) * args.d ** -0.5).requires_grad_()
    ours(h_s, h_t, weight)  # warm-up: first touch, BLAS buffers
    h_s.grad = weight.grad = None
    base = vm_kib("VmRSS")
    reset_peak()
    ours(h_s, h_t, weight)
    peak_mib = (vm_kib("VmHWM") - base) / 1024
    gradients_mib = 4 * (args.vocab * args.d + args.n * args.d) / 2**20
    floor_times, our_times = [], []
    for _ in range(args.reps):
        start = time.perf_counter()
        floor_step(h_s, h_t, weight, None)
        h_s.grad = weight.grad = None
        floor_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        ours(h_s, h_t, weight)
        our_times.append(time.perf_counter() - start)
    floor, mine = statistics.median(floor_times), statistics.median(our_times)
    print(f"N={args.n} D={args.d} V={args.vocab} threads={args.threads}: floor {floor:.2f}s ours {mine:.2f}s "
          f"ratio {mine / floor:.2f} (floor reps {['%.2f' % t for t in floor_times]}, ours {['%.2f' % t for t in our_times]}); "
          f"peak over inputs {peak_mib:.0f} MiB = {peak_mib / gradients_mib:.2f}x gradients ({gradients_mib:.0f} MiB)")


if __name__ == "__main__":
    main()
