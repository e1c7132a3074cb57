"""The issue-13 table for the native backend: its error against a float64 truth next to the error of
the plain materialised computation in fp32 (for bf16/fp16 inputs: the plain computation on the
inputs upcast to fp32, with its gradients rounded to the input dtype, as the backend returns them).

    PYTHONPATH=. python csrc/tests/check_exactness.py [--dtype bfloat16] [--seed 1]

Calls the backend protocol directly (crisp_fast.backends.native), so it does not depend on how
crisp_fast.loss reads the statistics. Errors are max-abs, relative to the truth's max-abs.
"""
from __future__ import annotations

import argparse
import math

import torch

from crisp_fast.backends import native

try:
    from crisp_fast.kernels import stats_layout as L
except ImportError:
    from kernels import stats_layout as L


def masked_divergence(ys, yt, *, divergence, beta, temperature):
    """Per-row divergence with p log p = 0 where p = 0 (exact for -inf logits)."""
    log_p = torch.log_softmax(ys / temperature, -1)
    log_q = torch.log_softmax(yt / temperature, -1)

    def kl(log_a, log_b):
        # safe values where a = 0, so that neither the forward nor autograd forms 0 * -inf
        mask = log_a > -math.inf
        log_a, log_b = torch.where(mask, log_a, 0.0), torch.where(mask, log_b, 0.0)
        return torch.where(mask, log_a.exp() * (log_a - log_b), 0.0).sum(-1)

    def entropy(log_a):
        mask = log_a > -math.inf
        log_a = torch.where(mask, log_a, 0.0)
        return -torch.where(mask, log_a.exp() * log_a, 0.0).sum(-1)

    if divergence == "reverse_kl":
        div = kl(log_p, log_q)
    elif divergence == "forward_kl":
        div = kl(log_q, log_p)
    else:
        log_m = torch.logaddexp(log_p + math.log(1 - beta), log_q + math.log(beta))
        div = beta * kl(log_q, log_m) + (1 - beta) * kl(log_p, log_m)
    return (div, torch.logsumexp(ys / temperature, -1), torch.logsumexp(yt / temperature, -1), entropy(log_p),
            entropy(log_q))


def plain(hs, ht, w, bias, teacher_bias, upstream, *, dtype, **options):
    """(loss rows, lse_s, lse_t, H_s, H_t, dh, dW) of the materialised computation in `dtype`.
    Vocabulary entries that are -inf on both sides (banned tokens) are left out (p = q = 0 there:
    they add nothing, and autograd through a -inf logit would give 0 * inf = NaN)."""
    keep = torch.ones(w.shape[0], dtype=torch.bool)
    if bias is not None and teacher_bias is not None:
        keep = torch.isfinite(bias) | torch.isfinite(teacher_bias)
    hs = hs.to(dtype).requires_grad_()
    w_all = w.to(dtype).requires_grad_()
    w = w_all[keep]
    ys = hs @ w.T + (0 if bias is None else bias[keep].to(dtype))
    yt = ht.to(dtype) @ w.detach().T + (0 if teacher_bias is None else teacher_bias[keep].to(dtype))
    div, lse_s, lse_t, h_s, h_t = masked_divergence(ys, yt, **options)
    dh, dw = torch.autograd.grad((div * upstream.to(dtype)).sum(), [hs, w_all])
    return [t.detach() for t in (div, lse_s, lse_t, h_s, h_t, dh, dw)]


def ours(hs, ht, w, bias, teacher_bias, upstream, *, fused, **options):
    kwargs = dict(divergence=options["divergence"], beta=options["beta"], temperature=options["temperature"])
    if fused:
        stats, (dh, dw, _) = native.forward_backward(hs, ht, w, None, bias, teacher_bias, upstream, None,
                                                     need_grad_hidden=True, need_grad_weight=True,
                                                     need_grad_bias=False, **kwargs)
    else:
        stats = native.forward(hs, ht, w, None, bias, teacher_bias, **kwargs)
        dh, dw, _ = native.backward(hs, ht, w, None, bias, teacher_bias, stats, upstream, None, need_grad_hidden=True,
                                    need_grad_weight=True, need_grad_bias=False, **kwargs)
    s = stats.double()
    return [s[:, L.LOSS], s[:, L.STUDENT_MAX] + s[:, L.STUDENT_LOG_Z], s[:, L.TEACHER_MAX] + s[:, L.TEACHER_LOG_Z],
            s[:, L.STUDENT_ENTROPY], s[:, L.TEACHER_ENTROPY], dh.to(hs.dtype), dw.to(hs.dtype)]


NAMES = ("loss", "lse_s", "lse_t", "H_s", "H_t", "dh", "dW")


def cases(dtype):
    """name -> (hs, ht, w, student bias, teacher bias, options)."""
    out = {}
    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    opts = dict(divergence="reverse_kl", beta=1.0, temperature=1.0)
    # peaked: every row's top logit ~30 above the rest
    n, d, v = 37, 48, 1009
    hs, w = randn(n, d), randn(v, d, scale=0.3)
    top = torch.randint(0, v, (n,), generator=g)
    w_peak = w.clone()
    hs[:, 0] = 10.0
    w_peak[:, 0] = 0.0
    w_peak[top, 0] = 3.0
    out["peaked, top logit ~30 above"] = (hs, hs + randn(n, d, scale=0.3), w_peak, None, None, opts)
    # logits ~ +-1e4, exact fp32 integers (a large mean column of W), KL of order 1
    hs = torch.randint(-3, 4, (n, d), generator=g).float()
    w = torch.randint(-1, 2, (v, d), generator=g).float()
    hs[:, 0], w[:, 0] = 100.0, 100.0 * torch.sign(randn(1)).item()
    ht = hs.clone()
    ht[:, 1:] += torch.randint(-1, 2, (n, d - 1), generator=g).float()
    out["logits ~ +-1e4"] = (hs, ht, w, None, None, opts)
    # temperature 0.05 and 4
    hs, ht, w = randn(n, d), randn(n, d), randn(v, d, scale=3 / math.sqrt(d))
    out["temperature 0.05"] = (hs, ht, w, None, None, dict(opts, temperature=0.05))
    out["temperature 4"] = (hs, ht, w, None, None, dict(opts, temperature=4.0))
    # p_max = 1 - 1e-7: top logit ~ 16 + log V above the rest
    hs2, w2 = hs.clone(), w.clone()
    hs2[:, 0], w2[:, 0] = 1.0, 0.0
    w2[top, 0] = 23.0
    out["p_max ~ 1 - 1e-7"] = (hs2, hs2 + randn(n, d, scale=0.1), w2, None, None, opts)
    # -inf entries in the student bias (banned tokens)
    bias = randn(v)
    bias[torch.randperm(v, generator=g)[: v // 5]] = -math.inf
    out["-inf student bias"] = (hs, ht, w, bias, None, opts)
    out["-inf student bias, jsd 0.4"] = (hs, ht, w, bias, None, dict(opts, divergence="jsd", beta=0.4))
    teacher_bias = randn(v)
    teacher_bias[~torch.isfinite(bias)] = -math.inf  # the same banned tokens on both sides
    out["-inf both biases, forward kl"] = (hs, ht, w, bias, teacher_bias, dict(opts, divergence="forward_kl"))
    out["-inf both biases, reverse kl"] = (hs, ht, w, bias, teacher_bias, opts)
    # V = 151,936, plain N(0,1)
    out["V = 151,936"] = (randn(3, 8), randn(3, 8), randn(151936, 8), None, None, opts)
    return {name: (h.to(dtype), t.to(dtype), ww.to(dtype), b, bt, o) for name, (h, t, ww, b, bt, o) in out.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    ok, why = native.is_available()
    assert ok, why
    print(f"native {native.build_info()}")
    print(f"{'case':30s} {'quantity':6s} {'plain fp32':>10s} {'fused':>10s} {'fwd+bwd':>10s}")
    worst = 0.0
    for name, (hs, ht, w, bias, teacher_bias, options) in cases(dtype).items():
        upstream = torch.rand(hs.shape[0]) + 0.5
        to64 = lambda t: None if t is None else t.double()  # noqa: E731
        truth = plain(*map(to64, (hs, ht, w, bias, teacher_bias)), upstream, dtype=torch.float64, **options)
        base = plain(hs.float(), ht.float(), w.float(), bias, teacher_bias, upstream, dtype=torch.float32, **options)
        base = [b.to(dtype) if i >= 5 else b for i, b in enumerate(base)]
        fused = ours(hs, ht, w, bias, teacher_bias, upstream, fused=True, **options)
        split = ours(hs, ht, w, bias, teacher_bias, upstream, fused=False, **options)
        for i, quantity in enumerate(NAMES):
            scale = truth[i].abs().max().item() or 1.0
            errs = [(x[i].double() - truth[i]).abs().max().item() / scale for x in (base, fused, split)]
            ratio = max(errs[1], errs[2]) / max(errs[0], 1e-7)
            worst = max(worst, ratio)
            flag = "  <-- over 2x" if ratio > 2 else ""
            print(f"{name:30s} {quantity:6s} {errs[0]:10.2e} {errs[1]:10.2e} {errs[2]:10.2e}{flag}")
    print(f"worst ratio to plain (with a 1e-7 floor): {worst:.2f}")


if __name__ == "__main__":
    main()
