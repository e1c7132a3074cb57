"""The pure-PyTorch backend: the fused algorithm in plain torch ops, runs anywhere.

Two strategies, both bounded by a memory budget and neither holding a tokens x vocab tensor:

* `forward` / `backward` (used for reduction="none", or when no gradient is needed) tile over
  tokens and vocabulary. Forward keeps an online log-sum-exp per row for both sides plus the
  accumulators of the divergence; backward recomputes each logits tile from the saved row
  statistics. Cost: 6 GEMMs of 2*N*D*V FLOPs (2 forward, 2 recompute, dh, dW).

* `forward_backward` for reverse KL (scalar reductions: the per-row gradient coefficients are
  known before the loss) takes a chunk of rows across the whole vocabulary at once, so each row's statistics are
  exact before its gradient is formed and nothing is recomputed: 4 GEMMs, the floor. The chunk
  has `rows x V` elements, with `rows` chosen so its buffers fit the budget.

The budget defaults to 40% of the irreducible gradient memory (fp32 dW + dh), at least 32 MiB;
override with CRISP_FAST_TORCH_BUDGET_MB.
"""
from __future__ import annotations

import math
import os

import torch

from crisp_fast.backends import (
    GRAD_SHIFT, LOSS, NUM_STATS, STUDENT_ENTROPY, STUDENT_LSE, STUDENT_RAW_LSE, TEACHER_LSE,
)

VOCAB_TILE = 8192


def is_available():
    return True, ""


def _budget_bytes(n, d, vocab, need_grad_weight=True):
    if "CRISP_FAST_TORCH_BUDGET_MB" in os.environ:
        return int(float(os.environ["CRISP_FAST_TORCH_BUDGET_MB"]) * 2**20)
    irreducible = 4 * (n * d + (vocab * d if need_grad_weight else 0))
    return max(32 * 2**20, int(0.4 * irreducible))


def _compute_dtype(tensor):
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _capped_logits(hidden, weight, bias, scale, softcap):
    """y = softcap(scale * (h W^T + b)) for one block, in the compute dtype."""
    y = hidden @ weight.to(hidden.dtype).T
    if bias is not None:
        y += bias.to(y.dtype)
    if scale != 1.0:
        y *= scale
    if softcap is not None:
        y = torch.tanh(y / softcap).mul_(softcap)
    return y


def _cap_derivative(capped, scale, softcap):
    """d y / d(h W^T + b) given the capped logits y."""
    if softcap is None:
        return scale
    return (1.0 - (capped / softcap) ** 2) * scale


def _logsumexp_rows(x):
    """torch.logsumexp(x, dim=1) with temporaries of rows x VOCAB_TILE only: the library call
    allocates x's size again (measured: the 4-GEMM path peaked at 1.9x the gradients with it)."""
    row_max = x.amax(dim=1)
    # rows whose max is +-inf: subtract 0 so that inf - inf never happens (the sum gives inf or 0)
    shift = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    total = torch.zeros_like(row_max, dtype=torch.float64)
    for v0 in range(0, x.shape[1], VOCAB_TILE):
        total += torch.exp(x[:, v0:v0 + VOCAB_TILE] - shift[:, None]).sum(dim=1).double()
    # float64 out: a divergence is a difference of log-sum-exps far larger than itself, and their
    # fp32 rounding alone measured 1e-4 relative error on a training step's KL of 1e-3
    return shift.double() + torch.log(total)


def _rowdot(a, b):
    """sum_j a_ij b_ij without a rows x cols temporary (dispatches to a batched GEMV)."""
    return torch.einsum("ij,ij->i", a, b)


class _OnlineLSE:
    """Running max and rescaled sum of exp per row, plus accumulators weighted by the same exps."""

    def __init__(self, rows, n_acc, device, dtype):
        # per-row values in float64 (vectors: free). A divergence is a difference of these
        # statistics, each far larger than it; in fp32 that difference was the error of the
        # per-token KL (6e-5 relative against 2.5e-6 for materialised fp32 on some inputs).
        self.max = torch.full((rows,), -math.inf, device=device, dtype=torch.float64)
        self.total = torch.zeros(rows, device=device, dtype=torch.float64)
        self.acc = torch.zeros(n_acc, rows, device=device, dtype=torch.float64)

    def update(self, x, *weighted):
        """x: [rows, cols] logits; weighted: [rows, cols] values whose exp(x)-weighted sums accumulate."""
        new_max = torch.maximum(self.max, x.amax(dim=1).double())
        # a row whose max is still -inf contributes nothing; avoid inf - inf
        safe_max = torch.where(torch.isinf(new_max) & (new_max < 0), torch.zeros_like(new_max), new_max)
        rescale = torch.exp(self.max - safe_max)
        e = torch.exp(x - safe_max.to(x.dtype)[:, None])  # the max of fp32 values is exact in fp32
        self.total = self.total * rescale + e.sum(dim=1).double()
        for k, values in enumerate(weighted):
            self.acc[k] = self.acc[k] * rescale + _rowdot(e, values).double()
        self.max = new_max

    def lse(self):
        return self.max + torch.log(self.total)

    def mean(self, k):
        return self.acc[k] / self.total


# ------------------------------------------------------------------------------------------
# tiled forward (statistics only) and backward (recompute)
# ------------------------------------------------------------------------------------------
def _tiles(n, vocab, budget, per_element_bytes):
    vocab_tile = min(vocab, VOCAB_TILE)
    rows = max(1, min(n, budget // (per_element_bytes * vocab_tile)))
    return rows, vocab_tile


def forward(student_hidden, teacher_hidden, weight, teacher_weight, student_bias, teacher_bias, *,
            divergence, beta, temperature, student_scale, teacher_scale, student_softcap, teacher_softcap,
            need_raw_lse):
    n, d = student_hidden.shape
    vocab = weight.shape[0]
    t_weight = weight if teacher_weight is None else teacher_weight
    dtype = _compute_dtype(student_hidden)
    stats = torch.zeros(n, NUM_STATS, device=student_hidden.device, dtype=dtype)
    rows_per_tile, vocab_tile = _tiles(n, vocab, _budget_bytes(n, d, vocab), per_element_bytes=4 * 10)

    def logits_tile(r0, r1, v0, v1):
        ys = _capped_logits(student_hidden[r0:r1].to(dtype), weight[v0:v1], _slice(student_bias, v0, v1),
                            student_scale, student_softcap)
        yt = _capped_logits(teacher_hidden[r0:r1].to(dtype), t_weight[v0:v1], _slice(teacher_bias, v0, v1),
                            teacher_scale, teacher_softcap)
        return ys, ys / temperature, yt / temperature

    for r0 in range(0, n, rows_per_tile):
        r1 = min(n, r0 + rows_per_tile)
        rows = r1 - r0
        # student accumulators: E[x_s - x_t], E[x_s]; teacher accumulator: E_q[x_t - x_s]
        student = _OnlineLSE(rows, 2, student_hidden.device, dtype)
        teacher = _OnlineLSE(rows, 1, student_hidden.device, dtype)
        raw = _OnlineLSE(rows, 0, student_hidden.device, dtype) if need_raw_lse else None
        for v0 in range(0, vocab, vocab_tile):
            v1 = min(vocab, v0 + vocab_tile)
            ys, xs, xt = logits_tile(r0, r1, v0, v1)
            difference = xs - xt
            student.update(xs, difference, xs)
            teacher.update(xt, difference.neg_())
            if raw is not None:
                raw.update(ys)
        lse_s, lse_t = student.lse(), teacher.lse()
        block = stats[r0:r1]
        block[:, STUDENT_LSE], block[:, TEACHER_LSE] = lse_s, lse_t
        block[:, STUDENT_ENTROPY] = lse_s - student.mean(1)
        if raw is not None:
            block[:, STUDENT_RAW_LSE] = raw.lse()
        if divergence == "reverse_kl":
            # KL(p||q) = E_p[x_s - x_t] - lse_s + lse_t
            block[:, LOSS] = block[:, GRAD_SHIFT] = student.mean(0) - lse_s + lse_t
        elif divergence == "forward_kl":
            block[:, LOSS] = teacher.mean(0) - lse_t + lse_s
        else:  # jsd needs the final lse of both sides: a second sweep over the vocabulary
            kl_q_m = torch.zeros(rows, device=stats.device, dtype=dtype)
            kl_p_m = torch.zeros_like(kl_q_m)
            for v0 in range(0, vocab, vocab_tile):
                v1 = min(vocab, v0 + vocab_tile)
                _, xs, xt = logits_tile(r0, r1, v0, v1)
                log_p, log_q = xs - lse_s[:, None], xt - lse_t[:, None]
                log_m = torch.logaddexp(log_p + math.log1p(-beta), log_q + math.log(beta))
                kl_q_m += _rowdot(log_q.exp(), log_q - log_m)
                kl_p_m += _rowdot(log_p.exp(), log_p - log_m)
            block[:, LOSS] = beta * kl_q_m + (1 - beta) * kl_p_m
            block[:, GRAD_SHIFT] = kl_p_m
    return stats


def _slice(bias, v0, v1):
    return None if bias is None else bias[v0:v1]


def _logit_gradient(xs, xt, ys, row_stats, grad_loss, grad_raw_lse, *, divergence, beta, temperature,
                    student_scale, student_softcap):
    """dL/da for one tile, a = h W^T + b (the student's pre-activation)."""
    log_p = xs - row_stats[:, STUDENT_LSE, None]
    log_q = xt - row_stats[:, TEACHER_LSE, None]
    p = log_p.exp()
    shift = row_stats[:, GRAD_SHIFT, None]
    if divergence == "reverse_kl":
        g = p * (log_p - log_q - shift)
    elif divergence == "forward_kl":
        g = p - log_q.exp()
    else:
        log_m = torch.logaddexp(log_p + math.log1p(-beta), log_q + math.log(beta))
        g = (1 - beta) * p * (log_p - log_m - shift)
    g *= (grad_loss / temperature)[:, None]
    if grad_raw_lse is not None:
        g += grad_raw_lse[:, None] * torch.exp(ys - row_stats[:, STUDENT_RAW_LSE, None])
    return g * _cap_derivative(ys, student_scale, student_softcap)


def backward(student_hidden, teacher_hidden, weight, teacher_weight, student_bias, teacher_bias, stats,
             grad_loss, grad_raw_lse, *, need_grad_hidden, need_grad_weight, need_grad_bias,
             divergence, beta, temperature, student_scale, teacher_scale, student_softcap, teacher_softcap,
             need_raw_lse):
    n, d = student_hidden.shape
    vocab = weight.shape[0]
    t_weight = weight if teacher_weight is None else teacher_weight
    dtype = _compute_dtype(student_hidden)
    device = student_hidden.device
    grad_hidden = torch.zeros(n, d, device=device, dtype=dtype) if need_grad_hidden else None
    grad_weight = torch.zeros(vocab, d, device=device, dtype=dtype) if need_grad_weight else None
    grad_bias = torch.zeros(vocab, device=device, dtype=dtype) if need_grad_bias else None
    rows_per_tile, vocab_tile = _tiles(n, vocab, _budget_bytes(n, d, vocab, need_grad_weight), 4 * 10)
    stats = stats.to(dtype)
    for r0 in range(0, n, rows_per_tile):
        r1 = min(n, r0 + rows_per_tile)
        h_s = student_hidden[r0:r1].to(dtype)
        h_t = teacher_hidden[r0:r1].to(dtype)
        for v0 in range(0, vocab, vocab_tile):
            v1 = min(vocab, v0 + vocab_tile)
            ys = _capped_logits(h_s, weight[v0:v1], _slice(student_bias, v0, v1), student_scale, student_softcap)
            yt = _capped_logits(h_t, t_weight[v0:v1], _slice(teacher_bias, v0, v1), teacher_scale, teacher_softcap)
            g = _logit_gradient(ys / temperature, yt / temperature, ys, stats[r0:r1], grad_loss[r0:r1].to(dtype),
                                None if grad_raw_lse is None else grad_raw_lse[r0:r1].to(dtype),
                                divergence=divergence, beta=beta, temperature=temperature,
                                student_scale=student_scale, student_softcap=student_softcap)
            if grad_hidden is not None:
                grad_hidden[r0:r1].addmm_(g, weight[v0:v1].to(dtype))
            if grad_weight is not None:
                grad_weight[v0:v1].addmm_(g.T, h_s)
            if grad_bias is not None:
                grad_bias[v0:v1] += g.sum(dim=0)
    return grad_hidden, grad_weight, grad_bias


# ------------------------------------------------------------------------------------------
# 4-GEMM forward+backward for scalar reductions
# ------------------------------------------------------------------------------------------
def forward_backward(student_hidden, teacher_hidden, weight, teacher_weight, student_bias, teacher_bias,
                     grad_loss, grad_raw_lse, *, need_grad_hidden, need_grad_weight, need_grad_bias,
                     divergence, beta, temperature, student_scale, teacher_scale, student_softcap,
                     teacher_softcap, need_raw_lse):
    options = dict(divergence=divergence, beta=beta, temperature=temperature, student_scale=student_scale,
                   teacher_scale=teacher_scale, student_softcap=student_softcap, teacher_softcap=teacher_softcap,
                   need_raw_lse=need_raw_lse)
    if divergence != "reverse_kl":
        # jsd needs two sweeps anyway and forward KL is not the hot path: the tiled pair is exact
        stats = forward(student_hidden, teacher_hidden, weight, teacher_weight, student_bias, teacher_bias, **options)
        grads = backward(student_hidden, teacher_hidden, weight, teacher_weight, student_bias, teacher_bias, stats,
                         grad_loss, grad_raw_lse, need_grad_hidden=need_grad_hidden,
                         need_grad_weight=need_grad_weight, need_grad_bias=need_grad_bias, **options)
        return stats, grads

    n, d = student_hidden.shape
    vocab = weight.shape[0]
    t_weight = weight if teacher_weight is None else teacher_weight
    dtype = _compute_dtype(student_hidden)
    device = student_hidden.device
    stats = torch.zeros(n, NUM_STATS, device=device, dtype=dtype)
    grad_hidden = torch.zeros(n, d, device=device, dtype=dtype) if need_grad_hidden else None
    grad_weight = torch.zeros(vocab, d, device=device, dtype=dtype) if need_grad_weight else None
    grad_bias = torch.zeros(vocab, device=device, dtype=dtype) if need_grad_bias else None
    # three rows x V buffers live at once (student, teacher, scratch)
    rows_per_chunk = max(1, min(n, _budget_bytes(n, d, vocab, need_grad_weight) // (3 * 4 * vocab)))

    # The GEMMs run over vocabulary blocks, never the whole vocabulary at once: a single call with
    # a 151,936-long dimension lets the BLAS allocate packing buffers of that length (measured: the
    # first forward+backward peaked at 1.52x the gradients, against 1.40x by blocks), and the
    # blocks upcast a low-precision weight piece by piece (logits are fp32 whatever the input dtype).
    vocab_blocks = [(v0, min(vocab, v0 + VOCAB_TILE)) for v0 in range(0, vocab, VOCAB_TILE)]

    def weight_block(w, v0, v1):
        return w[v0:v1] if w.dtype == dtype else w[v0:v1].to(dtype)

    def full_vocab_logits(hidden, w, bias, scale, softcap, out):
        for v0, v1 in vocab_blocks:
            torch.mm(hidden, weight_block(w, v0, v1).T, out=out[:, v0:v1])
        if bias is not None:
            out += bias.to(dtype)
        if scale != 1.0:
            out *= scale
        if softcap is not None:
            out.div_(softcap).tanh_().mul_(softcap)
        return out

    # one allocation for every chunk: a fresh one per chunk would be page-faulted in again, and
    # the previous chunk's views would keep its buffers alive while the next ones are allocated
    buffers = torch.empty(3, rows_per_chunk * vocab, device=device, dtype=dtype)
    for r0 in range(0, n, rows_per_chunk):
        r1 = min(n, r0 + rows_per_chunk)
        rows = r1 - r0
        h_s = student_hidden[r0:r1].to(dtype)
        ys, xt, scratch = (buffer[: rows * vocab].view(rows, vocab) for buffer in buffers)
        full_vocab_logits(h_s, weight, student_bias, student_scale, student_softcap, ys)
        full_vocab_logits(teacher_hidden[r0:r1].to(dtype), t_weight, teacher_bias, teacher_scale, teacher_softcap, xt)
        block = stats[r0:r1]
        if need_raw_lse:
            block[:, STUDENT_RAW_LSE] = _logsumexp_rows(ys)
        # every pass below reads rows x V floats from memory: the loop does as few as it can
        if temperature != 1.0:
            xt /= temperature
        # at T = 1 the tempered student logits are ys itself: no copy into scratch
        xs = torch.div(ys, temperature, out=scratch) if temperature != 1.0 else ys
        lse_s, lse_t = _logsumexp_rows(xs), _logsumexp_rows(xt)
        block[:, STUDENT_LSE], block[:, TEACHER_LSE] = lse_s, lse_t
        # xt <- log p - log q = (x_s - x_t) + (lse_t - lse_s): the logit difference is small where
        # the distributions are close and the row constant is formed in float64, so each term
        # rounds at the size of the divergence, not of the logits
        d = torch.sub(xs, xt, out=xt).add_((lse_t - lse_s).to(dtype)[:, None])
        log_p = torch.sub(xs, lse_s.to(dtype)[:, None], out=scratch)  # scratch <- log p (xs may be scratch)
        p = log_p.exp_()                               # scratch <- p
        kl = _rowdot(p, d)
        block[:, LOSS] = block[:, GRAD_SHIFT] = kl
        # H(p) = -E_p[log p] = lse_s - E_p[x_s], with x_s = y_s / T
        block[:, STUDENT_ENTROPY] = lse_s - _rowdot(p, ys) / temperature
        g = d.sub_(kl[:, None]).mul_(p)                # xt <- p (log p - log q - KL) = dKL/dx_s
        # d loss / d y_s = row_scale * g: the per-row factor is applied to the [rows, D] GEMM
        # operands instead of the [rows, V] gradient (one pass over g fewer)
        row_scale = grad_loss[r0:r1].to(dtype) * (student_scale / temperature)
        if grad_raw_lse is not None:
            # + grad_raw * softmax(y_s) (scratch is free now), so the row factor goes into g first
            g *= (grad_loss[r0:r1].to(dtype) / temperature)[:, None]
            softmax_raw = torch.sub(ys, block[:, STUDENT_RAW_LSE, None], out=scratch).exp_()
            g.addcmul_(softmax_raw, grad_raw_lse[r0:r1].to(dtype)[:, None])
            row_scale = torch.full_like(row_scale, student_scale)
        if student_softcap is not None:
            g *= torch.div(ys, student_softcap, out=scratch).square_().neg_().add_(1.0)
        if grad_hidden is not None:
            for v0, v1 in vocab_blocks:
                grad_hidden[r0:r1].addmm_(g[:, v0:v1], weight_block(weight, v0, v1))
            grad_hidden[r0:r1] *= row_scale[:, None]
        if grad_weight is not None:
            scaled_hidden = h_s * row_scale[:, None]
            for v0, v1 in vocab_blocks:
                grad_weight[v0:v1].addmm_(g[:, v0:v1].T, scaled_hidden)
        if grad_bias is not None:
            grad_bias.addmv_(g.T, row_scale)
    return stats, (grad_hidden, grad_weight, grad_bias)

