"""The pure-PyTorch backend: the fused algorithm in plain torch ops, runs anywhere.

Two strategies, both bounded by a memory budget and neither holding a tokens x vocab tensor:

* `forward` / `backward` (used for reduction="none", or when no gradient is needed) tile over
  tokens and vocabulary. Forward keeps an online max and rescaled sums per row for both sides;
  backward recomputes each logits tile from the saved row statistics. Cost: 6 GEMMs of 2*N*D*V
  FLOPs (2 forward, 2 recompute, dh, dW); 5 without dW (a frozen lm_head, e.g. LoRA).

* `forward_backward` (scalar reductions: the per-row gradient coefficients are known before the
  loss) takes a chunk of rows across the whole vocabulary at once, so each row's statistics are
  exact before its gradient is formed and nothing is recomputed: 4 GEMMs (3 without dW). The
  dh / dW GEMMs of one chunk run in the same vocabulary-block loop as the logits GEMMs of the
  next, so a bf16/fp16 weight block is upcast to fp32 once per chunk for all of them.

Numerics (see crisp_fast.backends): logits are fp32 (the plain upcast computation's); every
probability, log-ratio and gradient shift is formed from max-shifted logits; row sums are
accumulated in float64 (within a block too: see _row_sum); where a bias
has -inf entries the products with p = 0 are masked, so they contribute exactly 0.

The budget defaults to 40% of the irreducible gradient memory (fp32 dW + dh), at least 32 MiB;
override with CRISP_FAST_TORCH_BUDGET_MB.
"""
from __future__ import annotations

import math
import os

import torch

from crisp_fast.backends import (
    DEFAULT_WORKSPACE_SHARE, GRAD_SHIFT, GRAD_SHIFT_LO, LOSS, NUM_STATS, STUDENT_ENTROPY, STUDENT_LOG_Z, STUDENT_MAX,
    STUDENT_RAW_LOG_Z, STUDENT_RAW_MAX, TEACHER_ENTROPY, TEACHER_LOG_Z, TEACHER_MAX,
)

VOCAB_TILE = 8192          # the tiled path's vocabulary tile
CAST_BLOCK_BYTES = 4 << 20  # the fused path's vocabulary block: an fp32 weight block of ~4 MiB (stays in cache)


def is_available():
    return True, ""


def _budget_bytes(n, d, vocab, need_grad_weight=True, workspace_bytes=None):
    if "CRISP_FAST_TORCH_BUDGET_MB" in os.environ:
        return int(float(os.environ["CRISP_FAST_TORCH_BUDGET_MB"]) * 2**20)
    if workspace_bytes is not None:
        return max(1, int(workspace_bytes))
    irreducible = 4 * (n * d + (vocab * d if need_grad_weight else 0))
    return max(32 * 2**20, int(DEFAULT_WORKSPACE_SHARE * irreducible))


def _compute_dtype(tensor):
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _slice(bias, v0, v1):
    return None if bias is None else bias[v0:v1]


def _has_neg_inf(*biases):
    """-inf logits come from -inf bias entries (banned tokens); only then are products masked."""
    return any(b is not None and bool(torch.isneginf(b).any()) for b in biases)


def _capped_logits(hidden, weight, bias, scale, softcap, out=None):
    """y = softcap(scale * (h W^T + b)) for one block, in hidden's dtype (weight already cast)."""
    y = torch.mm(hidden, weight.T, out=out)
    if bias is not None:
        y += bias.to(y.dtype)
    if scale != 1.0:
        y *= scale
    if softcap is not None:
        y.div_(softcap).tanh_().mul_(softcap)
    return y


def _safe(row_max):
    """The shift actually subtracted: a row max of -inf (nothing seen yet) shifts by 0, so that
    -inf - -inf never happens; such a row's exps are all 0."""
    return torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)


def _row_sum(values):
    """sum over a block's columns in float64: an fp32 sum of a row with one entry near 1 (p_max
    ~ 1 - 1e-7) absorbs the tail (ulp(1) = 1.2e-7) and the entropy loses all its digits."""
    return values.sum(dim=1, dtype=torch.float64)


def _masked_sum(weights, values, masked):
    """sum_v weights * values per row; with `masked`, entries where weights == 0 contribute 0 even
    when values are -inf (0 * -inf)."""
    product = weights * values
    if masked:
        product = torch.where(weights > 0, product, 0.0)
    return _row_sum(product)


class _RowSums:
    """Per-row sums over the vocabulary, in float64, for both sides, under a running max:
    s0 = sum e, sx = sum e (x - m) and sd = sum e ((x_s - m_s) - (x_t - m_t)) (sign flipped for the
    teacher), with e = exp(x - m). On a new max the sums are rescaled and their shift corrected."""

    def __init__(self, rows, device, masked):
        zeros = lambda: torch.zeros(rows, device=device, dtype=torch.float64)  # noqa: E731
        self.max_s = torch.full((rows,), -math.inf, device=device, dtype=torch.float64)
        self.max_t = self.max_s.clone()
        self.s0_s, self.sx_s, self.sd_s = zeros(), zeros(), zeros()
        self.s0_t, self.sx_t, self.sd_t = zeros(), zeros(), zeros()
        self.masked = masked

    def set_max(self, max_s, max_t):
        """The final maxima known in advance (the fused path): no rescaling at all."""
        self.max_s, self.max_t = max_s.double(), max_t.double()

    def _rescale(self, s0, sx, sd, delta_own, delta_other):
        # e -> e * exp(delta_own); x - m -> x - m + delta_own; the difference term also + delta_other
        keep = s0 > 0
        scale = torch.where(keep, torch.exp(delta_own), torch.zeros_like(s0))
        zero = torch.zeros_like(s0)
        sx = torch.where(keep, (sx + delta_own * s0) * scale, zero)
        sd = torch.where(keep, (sd + (delta_own - delta_other) * s0) * scale, zero)
        return s0 * scale, sx, sd

    def update(self, xs, xt, track_max=True):
        """xs, xt: [rows, cols] tempered logits of one vocabulary block."""
        if track_max:
            new_s = torch.maximum(self.max_s, xs.amax(dim=1).double())
            new_t = torch.maximum(self.max_t, xt.amax(dim=1).double())
            delta_s, delta_t = _safe(self.max_s) - _safe(new_s), _safe(self.max_t) - _safe(new_t)
            self.s0_s, self.sx_s, self.sd_s = self._rescale(self.s0_s, self.sx_s, self.sd_s, delta_s, delta_t)
            self.s0_t, self.sx_t, self.sd_t = self._rescale(self.s0_t, self.sx_t, self.sd_t, delta_t, delta_s)
            self.max_s, self.max_t = new_s, new_t
        # the max of fp32 values is an fp32 value: these shifts round exactly as plain log_softmax's
        xs_shift = xs - _safe(self.max_s).to(xs.dtype)[:, None]
        xt_shift = xt - _safe(self.max_t).to(xt.dtype)[:, None]
        e_s, e_t = torch.exp(xs_shift), torch.exp(xt_shift)
        difference = xs_shift - xt_shift
        self.s0_s += _row_sum(e_s)
        self.s0_t += _row_sum(e_t)
        self.sx_s += _masked_sum(e_s, xs_shift, self.masked)
        self.sx_t += _masked_sum(e_t, xt_shift, self.masked)
        self.sd_s += _masked_sum(e_s, difference, self.masked)
        self.sd_t -= _masked_sum(e_t, difference, self.masked)

    def finish(self, block, divergence):
        """Fill the statistics columns (all but the jsd loss); returns (log Z_s, log Z_t) in float64."""
        log_z_s, log_z_t = torch.log(self.s0_s), torch.log(self.s0_t)
        block[:, STUDENT_MAX], block[:, TEACHER_MAX] = self.max_s, self.max_t
        block[:, STUDENT_LOG_Z], block[:, TEACHER_LOG_Z] = log_z_s, log_z_t
        block[:, STUDENT_ENTROPY] = log_z_s - self.sx_s / self.s0_s
        block[:, TEACHER_ENTROPY] = log_z_t - self.sx_t / self.s0_t
        if divergence == "reverse_kl":
            # KL(p||q) = E_p[(x_s - m_s) - (x_t - m_t)] - (log Z_s - log Z_t)
            kl = self.sd_s / self.s0_s - (log_z_s - log_z_t)
            block[:, LOSS] = block[:, GRAD_SHIFT] = kl
        elif divergence == "forward_kl":
            block[:, LOSS] = self.sd_t / self.s0_t - (log_z_t - log_z_s)
        return log_z_s, log_z_t


def _log_probs(xs, xt, row):
    """log p, log q of one block from max-shifted logits; `row` holds [rows, 1] fp32 columns."""
    log_p = (xs - row["max_s"]).sub_(row["log_z_s"])
    log_q = (xt - row["max_t"]).sub_(row["log_z_t"])
    return log_p, log_q


def _log_mixture(log_p, log_q, beta):
    return torch.logaddexp(log_p + math.log1p(-beta), log_q + math.log(beta))


def _jsd_sums(xs, xt, row, beta, masked):
    """(sum q (log q - log m), sum p (log p - log m)) of one block, float64 [rows]."""
    log_p, log_q = _log_probs(xs, xt, row)
    log_m = _log_mixture(log_p, log_q, beta)
    p, q = log_p.exp(), log_q.exp()
    # p = 0 (and q = 0) entries have log p = log m = -inf: always masked here
    return _masked_sum(q, log_q - log_m, True), _masked_sum(p, log_p - log_m, True)


def _divergence_gradient(xs, xt, row, divergence, beta, masked):
    """d divergence / d x_s for one block (before the row factor grad_loss / T)."""
    if divergence == "reverse_kl":
        # p (log p - log q - KL) = p (((x_s - m_s) - (x_t - m_t)) - (log Z_s - log Z_t + KL)),
        # the row constant `shift` formed in float64 and rounded once
        xs_shift = xs - row["max_s"]
        p = torch.exp(xs_shift - row["log_z_s"])
        g = xs_shift.sub_(xt - row["max_t"]).sub_(row["shift"]).sub_(row["shift_lo"]).mul_(p)
        return torch.where(p > 0, g, 0.0) if masked else g
    log_p, log_q = _log_probs(xs, xt, row)
    p = log_p.exp()
    if divergence == "forward_kl":
        return p.sub_(log_q.exp_())
    g = (log_p - _log_mixture(log_p, log_q, beta)).sub_(row["kl_p_m"]).mul_(p).mul_(1 - beta)
    return torch.where(p > 0, g, 0.0)


def _rounded(stats64, dtype):
    """The float64 statistics in the output dtype, the gradient shift kept as hi + lo."""
    stats64[:, GRAD_SHIFT_LO] = stats64[:, GRAD_SHIFT] - stats64[:, GRAD_SHIFT].to(dtype).double()
    return stats64.to(dtype)


def _row_constants(stats64, divergence, dtype):
    """The [rows, 1] columns the gradient needs, from float64 statistics."""
    col = lambda values: values.to(dtype)[:, None]  # noqa: E731
    row = {"max_s": col(stats64[:, STUDENT_MAX]), "max_t": col(stats64[:, TEACHER_MAX]),
           "log_z_s": col(stats64[:, STUDENT_LOG_Z]), "log_z_t": col(stats64[:, TEACHER_LOG_Z])}
    if divergence == "reverse_kl":
        shift = stats64[:, STUDENT_LOG_Z] - stats64[:, TEACHER_LOG_Z] + stats64[:, GRAD_SHIFT] + stats64[:, GRAD_SHIFT_LO]
        row["shift"], row["shift_lo"] = col(shift), col(shift - shift.to(dtype).double())
    elif divergence == "jsd":
        row["kl_p_m"] = col(stats64[:, GRAD_SHIFT] + stats64[:, GRAD_SHIFT_LO])
    return row


def _student_gradient(ys, xs, xt, row, grad_loss, grad_raw_lse, raw, *, divergence, beta, temperature,
                      student_scale, student_softcap, masked):
    """dL/da for one block (a = h W^T + b) up to the per-row factor returned with it, which the
    caller applies to the [rows, D] GEMM operands instead of the [rows, V] block."""
    g = _divergence_gradient(xs, xt, row, divergence, beta, masked)
    if grad_raw_lse is not None:
        g *= (grad_loss / temperature)[:, None]
        g.addcmul_(torch.exp((ys - raw[0]).sub_(raw[1])), grad_raw_lse[:, None])
        row_factor = torch.full_like(grad_loss, student_scale)
    else:
        row_factor = grad_loss * (student_scale / temperature)
    if student_softcap is not None:
        g *= (ys / student_softcap).square_().neg_().add_(1.0)
    return g, row_factor


def _raw_columns(block, dtype):
    return block[:, STUDENT_RAW_MAX].to(dtype)[:, None], block[:, STUDENT_RAW_LOG_Z].to(dtype)[:, None]


# ------------------------------------------------------------------------------------------
# tiled forward (statistics only) and backward (recompute)
# ------------------------------------------------------------------------------------------
def _tiles(n, vocab, budget, per_element_bytes):
    vocab_tile = min(vocab, VOCAB_TILE)
    rows = max(1, min(n, budget // (per_element_bytes * vocab_tile)))
    return rows, vocab_tile


def forward(student_hidden, teacher_hidden, weight, teacher_weight, student_bias, teacher_bias, *,
            divergence, beta, temperature, student_scale, teacher_scale, student_softcap, teacher_softcap,
            need_raw_lse, deterministic=False, workspace_bytes=None):
    # deterministic: every op here is bitwise repeatable on CPU (and run in a fixed order)
    n, d = student_hidden.shape
    vocab = weight.shape[0]
    t_weight = weight if teacher_weight is None else teacher_weight
    dtype = _compute_dtype(student_hidden)
    masked = _has_neg_inf(student_bias, teacher_bias)
    stats = torch.zeros(n, NUM_STATS, device=student_hidden.device, dtype=torch.float64)
    rows_per_tile, vocab_tile = _tiles(n, vocab, _budget_bytes(n, d, vocab, workspace_bytes=workspace_bytes), per_element_bytes=4 * 10)

    def logits_tile(h_s, h_t, v0, v1):
        ys = _capped_logits(h_s, weight[v0:v1].to(dtype), _slice(student_bias, v0, v1), student_scale, student_softcap)
        yt = _capped_logits(h_t, t_weight[v0:v1].to(dtype), _slice(teacher_bias, v0, v1), teacher_scale,
                            teacher_softcap)
        return ys, ys / temperature, yt.div_(temperature)

    for r0 in range(0, n, rows_per_tile):
        r1 = min(n, r0 + rows_per_tile)
        h_s, h_t = student_hidden[r0:r1].to(dtype), teacher_hidden[r0:r1].to(dtype)
        sums = _RowSums(r1 - r0, stats.device, masked)
        raw = _RowSums(r1 - r0, stats.device, masked) if need_raw_lse else None
        for v0 in range(0, vocab, vocab_tile):
            v1 = min(vocab, v0 + vocab_tile)
            ys, xs, xt = logits_tile(h_s, h_t, v0, v1)
            sums.update(xs, xt)
            if raw is not None:
                raw.update(ys, ys)
        block = stats[r0:r1]
        sums.finish(block, divergence)
        if raw is not None:
            block[:, STUDENT_RAW_MAX], block[:, STUDENT_RAW_LOG_Z] = raw.max_s, torch.log(raw.s0_s)
        if divergence == "jsd":  # log m needs both final log-sum-exps: a second sweep
            row = _row_constants(block, divergence, dtype)
            kl_q_m = torch.zeros(r1 - r0, device=stats.device, dtype=torch.float64)
            kl_p_m = torch.zeros_like(kl_q_m)
            for v0 in range(0, vocab, vocab_tile):
                v1 = min(vocab, v0 + vocab_tile)
                _, xs, xt = logits_tile(h_s, h_t, v0, v1)
                q_part, p_part = _jsd_sums(xs, xt, row, beta, masked)
                kl_q_m += q_part
                kl_p_m += p_part
            block[:, LOSS] = beta * kl_q_m + (1 - beta) * kl_p_m
            block[:, GRAD_SHIFT] = kl_p_m
    return _rounded(stats, dtype)


def backward(student_hidden, teacher_hidden, weight, teacher_weight, student_bias, teacher_bias, stats,
             grad_loss, grad_raw_lse, *, need_grad_hidden, need_grad_weight, need_grad_bias,
             divergence, beta, temperature, student_scale, teacher_scale, student_softcap, teacher_softcap,
             need_raw_lse, deterministic=False, workspace_bytes=None):
    n, d = student_hidden.shape
    vocab = weight.shape[0]
    t_weight = weight if teacher_weight is None else teacher_weight
    dtype = _compute_dtype(student_hidden)
    device = student_hidden.device
    masked = _has_neg_inf(student_bias, teacher_bias)
    grad_hidden = torch.zeros(n, d, device=device, dtype=dtype) if need_grad_hidden else None
    grad_weight = torch.zeros(vocab, d, device=device, dtype=dtype) if need_grad_weight else None
    grad_bias = torch.zeros(vocab, device=device, dtype=dtype) if need_grad_bias else None
    rows_per_tile, vocab_tile = _tiles(n, vocab, _budget_bytes(n, d, vocab, need_grad_weight, workspace_bytes), 4 * 10)
    stats64 = stats.double()
    for r0 in range(0, n, rows_per_tile):
        r1 = min(n, r0 + rows_per_tile)
        h_s = student_hidden[r0:r1].to(dtype)
        h_t = teacher_hidden[r0:r1].to(dtype)
        row = _row_constants(stats64[r0:r1], divergence, dtype)
        raw = _raw_columns(stats64[r0:r1], dtype) if grad_raw_lse is not None else None
        row_grad = grad_loss[r0:r1].to(dtype)
        row_raw = None if grad_raw_lse is None else grad_raw_lse[r0:r1].to(dtype)
        for v0 in range(0, vocab, vocab_tile):
            v1 = min(vocab, v0 + vocab_tile)
            w_block = weight[v0:v1].to(dtype)
            ys = _capped_logits(h_s, w_block, _slice(student_bias, v0, v1), student_scale, student_softcap)
            xt = _capped_logits(h_t, t_weight[v0:v1].to(dtype), _slice(teacher_bias, v0, v1), teacher_scale,
                                teacher_softcap).div_(temperature)
            g, row_factor = _student_gradient(
                ys, ys / temperature, xt, row, row_grad, row_raw, raw, divergence=divergence, beta=beta,
                temperature=temperature, student_scale=student_scale, student_softcap=student_softcap, masked=masked)
            g *= row_factor[:, None]
            if grad_hidden is not None:
                grad_hidden[r0:r1].addmm_(g, w_block)
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
                     teacher_softcap, need_raw_lse, deterministic=False, workspace_bytes=None):
    n, d = student_hidden.shape
    vocab = weight.shape[0]
    shared = teacher_weight is None
    dtype = _compute_dtype(student_hidden)
    device = student_hidden.device
    masked = _has_neg_inf(student_bias, teacher_bias)
    stats = torch.zeros(n, NUM_STATS, device=device, dtype=torch.float64)
    grad_hidden = torch.zeros(n, d, device=device, dtype=dtype) if need_grad_hidden else None
    grad_weight = torch.zeros(vocab, d, device=device, dtype=dtype) if need_grad_weight else None
    grad_bias = torch.zeros(vocab, device=device, dtype=dtype) if need_grad_bias else None
    need_weight_blocks_for_grads = grad_hidden is not None
    # three rows x V buffers live at once: this chunk's two logits, the previous chunk's gradient
    rows_per_chunk = max(1, min(n, _budget_bytes(n, d, vocab, need_grad_weight, workspace_bytes) // (3 * 4 * vocab)))
    widest = max(d, teacher_hidden.shape[1])
    # small D: wide blocks (fewer, larger epilogue ops); large D: a ~4 MiB fp32 weight block
    block_cols = max(256, min(4 * VOCAB_TILE, CAST_BLOCK_BYTES // (4 * widest)))
    blocks = [(v0, min(vocab, v0 + block_cols)) for v0 in range(0, vocab, block_cols)]

    # A chunk's buffer is laid out block-major: block b is a contiguous [rows, v1 - v0] matrix, so
    # every GEMM writes and reads contiguous operands and every epilogue op works on one block.
    buffers = [torch.empty(rows_per_chunk * vocab, device=device, dtype=dtype) for _ in range(3)]

    def block_views(buffer, rows):
        return [buffer[rows * v0: rows * v1].view(rows, v1 - v0) for v0, v1 in blocks]

    # reusable fp32 copies of one weight block (low-precision weights only): no allocation per block
    cast_student = None if weight.dtype == dtype else torch.empty(block_cols, d, device=device, dtype=dtype)
    cast_teacher = None
    if not shared and teacher_weight.dtype != dtype:
        cast_teacher = torch.empty(block_cols, teacher_weight.shape[1], device=device, dtype=dtype)

    def cast(w, v0, v1, out):
        return w[v0:v1] if out is None else out[: v1 - v0].copy_(w[v0:v1])

    chunks = [(r0, min(n, r0 + rows_per_chunk)) for r0 in range(0, n, rows_per_chunk)]
    previous = None  # (r0, r1, gradient blocks, row factor, scaled hidden) of the chunk awaiting dh / dW
    free = list(range(3))
    for step in range(len(chunks) + 1):
        current = chunks[step] if step < len(chunks) else None
        if current is not None:
            r0, r1 = current
            rows = r1 - r0
            h_s, h_t = student_hidden[r0:r1].to(dtype), teacher_hidden[r0:r1].to(dtype)
            i_s, i_t = free.pop(), free.pop()
            ys_blocks, xt_blocks = block_views(buffers[i_s], rows), block_views(buffers[i_t], rows)
        # one sweep over the vocabulary blocks: the previous chunk's dh / dW and this chunk's logits
        for b, (v0, v1) in enumerate(blocks):
            w_block = None
            if current is not None or (previous is not None and need_weight_blocks_for_grads):
                w_block = cast(weight, v0, v1, cast_student)
            if previous is not None:
                p0, p1, g_blocks, row_factor, scaled_hidden = previous[:5]
                if grad_hidden is not None:
                    grad_hidden[p0:p1].addmm_(g_blocks[b], w_block)
                if grad_weight is not None:
                    grad_weight[v0:v1].addmm_(g_blocks[b].T, scaled_hidden)
                if grad_bias is not None:
                    grad_bias[v0:v1].addmv_(g_blocks[b].T, row_factor)
            if current is not None:
                _capped_logits(h_s, w_block, _slice(student_bias, v0, v1), student_scale, student_softcap,
                               out=ys_blocks[b])
                t_block = w_block if shared else cast(teacher_weight, v0, v1, cast_teacher)
                _capped_logits(h_t, t_block, _slice(teacher_bias, v0, v1), teacher_scale, teacher_softcap,
                               out=xt_blocks[b]).div_(temperature)
        if previous is not None:
            p0, p1, _, row_factor, _ = previous[:5]
            if grad_hidden is not None:
                grad_hidden[p0:p1] *= row_factor[:, None]
            free.append(previous[5])
            previous = None
        if current is None:
            break
        row_factor = _chunk_epilogue(
            ys_blocks, xt_blocks, stats[r0:r1], grad_loss[r0:r1].to(dtype),
            None if grad_raw_lse is None else grad_raw_lse[r0:r1].to(dtype), divergence=divergence, beta=beta,
            temperature=temperature, student_scale=student_scale, student_softcap=student_softcap,
            need_raw_lse=need_raw_lse, masked=masked, dtype=dtype)
        free.append(i_s)  # the student logits are spent; the gradient now lives in the teacher's buffer
        previous = (r0, r1, xt_blocks, row_factor, h_s * row_factor[:, None] if grad_weight is not None else None,
                    i_t)
    return _rounded(stats, dtype), (grad_hidden, grad_weight, grad_bias)


def _chunk_epilogue(ys_blocks, xt_blocks, block, grad_loss, grad_raw_lse, *, divergence, beta, temperature,
                    student_scale, student_softcap, need_raw_lse, masked, dtype):
    """Statistics of a chunk of full rows (into `block`, float64) and the gradient blocks, written
    over the teacher's logits blocks. Returns the per-row factor of the gradient."""
    rows = block.shape[0]
    device = block.device
    # the max of the tempered logits is the tempered max: x / T rounds monotonically
    max_y = torch.stack([y.amax(dim=1) for y in ys_blocks]).amax(dim=0)
    max_t = torch.stack([x.amax(dim=1) for x in xt_blocks]).amax(dim=0)
    sums = _RowSums(rows, device, masked)
    sums.set_max(max_y / temperature, max_t)
    raw_s0 = torch.zeros(rows, device=device, dtype=torch.float64)
    for ys, xt in zip(ys_blocks, xt_blocks):
        sums.update(ys / temperature if temperature != 1.0 else ys, xt, track_max=False)
        if need_raw_lse:
            raw_s0 += _row_sum(torch.exp(ys - _safe(max_y.double()).to(dtype)[:, None]))
    sums.finish(block, divergence)
    if need_raw_lse:
        block[:, STUDENT_RAW_MAX], block[:, STUDENT_RAW_LOG_Z] = max_y.double(), torch.log(raw_s0)
    row = _row_constants(block, divergence, dtype)
    if divergence == "jsd":
        kl_q_m = torch.zeros(rows, device=device, dtype=torch.float64)
        kl_p_m = torch.zeros_like(kl_q_m)
        for ys, xt in zip(ys_blocks, xt_blocks):
            q_part, p_part = _jsd_sums(ys / temperature, xt, row, beta, masked)
            kl_q_m += q_part
            kl_p_m += p_part
        block[:, LOSS] = beta * kl_q_m + (1 - beta) * kl_p_m
        block[:, GRAD_SHIFT] = kl_p_m
        row = _row_constants(block, divergence, dtype)
    raw = _raw_columns(block, dtype) if grad_raw_lse is not None else None
    row_factor = None
    for ys, xt in zip(ys_blocks, xt_blocks):
        g, row_factor = _student_gradient(
            ys, ys / temperature, xt, row, grad_loss, grad_raw_lse, raw, divergence=divergence, beta=beta,
            temperature=temperature, student_scale=student_scale, student_softcap=student_softcap, masked=masked)
        xt.copy_(g)
    return row_factor
