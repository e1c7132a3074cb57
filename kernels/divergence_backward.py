"""Backward of the fused linear divergence: gradients of the student hidden states, lm_head weight
and bias, recomputing each logits tile from the saved per-token statistics (no tokens x vocab
tensor in memory).

Per tile (p = softmax(x_s), q = softmax(x_t), from x and the saved lse's):

    reverse_kl : g = p (log p - log q - KL)
    forward_kl : g = p - q
    jsd(beta)  : g = (1 - beta) p (log p - log m - KL(p||m))
    dL/dy = grad_loss g / T + grad_raw_lse softmax(y_s)          (y = T x, untempered capped logits)
    dL/da = dL/dy * scale * (1 - (y / cap)^2)                     (the last factor only with a softcap)

then dh += dL/da W, dW += (dL/da)^T h and db += column sums, accumulated in fp32 with atomics
(as Cut Cross-Entropy does; relaxed order: only atomicity matters, so no fences), so every program
is independent and the gradient never exists as a tokens x vocab tensor. Only the student side
gets gradients. The atomic order makes the result non-deterministic at the level of fp32 rounding.

Cost: 8 N D V FLOPs (4 for the logits recompute, 2 each for dh and dW), so forward + backward is the
12 N D V floor of recompute (kernel_traffic counts exactly that). The price of independence is the
fp32 atomics: N D (V / BV) + V D (N / BT) of them; at Qwen3-8B scale (N 8192, D 4096, V 151,936,
BT 64, BV 128) that is ~0.12 T element-RMWs, far more bytes than the 41 ms of bf16 FLOPs can hide
unless L2 absorbs them. Gradient filtering (skipping tiles whose |dL/da| is below bf16 resolution,
as Cut Cross-Entropy does) is the next step; it is not done here, so the result is exact.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .divergence_forward import (
    MODES, _log_mixture, _student_teacher_logits, aligned_for_vector_loads, gpu_tiles, heavy_options, interpreting,
    kernel_flags, scalar_args,
)



@triton.jit
def divergence_backward_kernel(
    hs_ptr, ht_ptr, w_ptr, wt_ptr, bs_ptr, bt_ptr, stats_ptr, grad_loss_ptr, grad_raw_ptr,
    dh_ptr, dw_ptr, db_ptr,
    N, V, D, DT,
    s_scale, t_scale, s_cap, t_cap, inv_temp, temperature, log_1m_beta, log_beta, one_m_beta,
    MODE: tl.constexpr, SHARED_W: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr,
    HAS_SCAP: tl.constexpr, HAS_TCAP: tl.constexpr, NEED_RAW: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Gradient tile of BT tokens x BV vocabulary entries, scattered into dh [N, D], dW [V, D], db [V].

    Stats columns read: 1 student lse, 2 teacher lse, 4 gradient shift, 5 raw lse.
    Grid (cdiv(N, BT), cdiv(V, BV)). Traffic per program: the logits recompute reads BT (D + Dt)
    hidden and BV (D [+ Dt]) weight elements; the scatter reads BV x D of W and BT x D of h_s again
    and does BT x D + BV x D fp32 atomic adds, so in all (V/BV) N D + (N/BT) V D atomics besides the
    reads of the forward.
    """
    pid_t = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_t * BT + tl.arange(0, BT)
    cols = pid_v * BV + tl.arange(0, BV)
    row_ok = rows < N
    col_ok = cols < V

    x_s, x_t = _student_teacher_logits(hs_ptr, ht_ptr, w_ptr, wt_ptr, bs_ptr, bt_ptr, rows, cols, row_ok, col_ok,
                                       D, DT, s_scale, t_scale, s_cap, t_cap, inv_temp,
                                       SHARED_W, HAS_BS, HAS_BT, HAS_SCAP, HAS_TCAP, BT, BV, BK, UPCAST, PRECISION)
    lse_s = tl.load(stats_ptr + rows * 6 + 1, mask=row_ok, other=0.0)
    lse_t = tl.load(stats_ptr + rows * 6 + 2, mask=row_ok, other=0.0)
    shift = tl.load(stats_ptr + rows * 6 + 4, mask=row_ok, other=0.0)
    upstream = tl.load(grad_loss_ptr + rows, mask=row_ok, other=0.0) * inv_temp

    log_p = x_s - lse_s[:, None]
    p = tl.exp(log_p)
    if MODE == 0:
        g = p * (log_p - (x_t - lse_t[:, None]) - shift[:, None])
    elif MODE == 1:
        g = p - tl.exp(x_t - lse_t[:, None])
    else:
        log_m = _log_mixture(log_p, x_t - lse_t[:, None], log_1m_beta, log_beta)
        g = one_m_beta * p * (log_p - log_m - shift[:, None])
    dy = g * upstream[:, None]
    if NEED_RAW:
        raw_lse = tl.load(stats_ptr + rows * 6 + 5, mask=row_ok, other=0.0)
        grad_raw = tl.load(grad_raw_ptr + rows, mask=row_ok, other=0.0)
        dy += grad_raw[:, None] * tl.exp(temperature * x_s - raw_lse[:, None])
    if HAS_SCAP:
        capped = x_s * (temperature / s_cap)  # tanh(z / cap) = y / cap
        dy = dy * (1.0 - capped * capped)
    da = tl.where(row_ok[:, None] & col_ok[None, :], dy * s_scale, 0.0)

    if NEED_DB:
        tl.atomic_add(db_ptr + cols, tl.sum(da, axis=0), mask=col_ok, sem="relaxed")
    if NEED_DH or NEED_DW:
        if UPCAST:
            da_in = da
        else:
            da_in = da.to(hs_ptr.dtype.element_ty)
        for k0 in range(0, D, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < D
            if NEED_DH:
                w = tl.load(w_ptr + cols[:, None] * D + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                if UPCAST:
                    w = w.to(tl.float32)
                dh = tl.dot(da_in, w, input_precision=PRECISION)
                tl.atomic_add(dh_ptr + rows[:, None] * D + ks[None, :], dh, mask=row_ok[:, None] & k_ok[None, :],
                              sem="relaxed")
            if NEED_DW:
                h = tl.load(hs_ptr + rows[:, None] * D + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                if UPCAST:
                    h = h.to(tl.float32)
                dw = tl.dot(tl.trans(da_in), h, input_precision=PRECISION)
                tl.atomic_add(dw_ptr + cols[:, None] * D + ks[None, :], dw, mask=col_ok[:, None] & k_ok[None, :],
                              sem="relaxed")


def backward_config(n: int, d: int, v: int, dtype: torch.dtype, *, heavy: bool = False, aligned: bool = True,
                    interpret: bool | None = None) -> dict:
    """Tiles of the backward kernel: the forward's GPU tiles (gpu_tiles; no spills and HGMMA for all
    four GEMMs on sm_90, see sm90_report). Interpreter: big blocks (its cost is per tile-operation)."""
    if interpret is None:
        interpret = interpreting()
    if interpret:
        block_t = max(16, min(64, triton.next_power_of_2(n)))
        return dict(BT=block_t, BV=max(16, min(max(512, 65536 // block_t), triton.next_power_of_2(v))),
                    BK=max(16, min(256, triton.next_power_of_2(d))), num_warps=4, num_stages=1)
    return gpu_tiles(aligned, heavy, dtype)


def divergence_backward(student_hidden, teacher_hidden, weight, teacher_weight, student_bias, teacher_bias,
                        stats, grad_loss, grad_raw_lse, *, need_grad_hidden=True, need_grad_weight=True,
                        need_grad_bias=True, divergence="reverse_kl", beta=1.0, temperature=1.0,
                        student_scale=1.0, teacher_scale=1.0, student_softcap=None, teacher_softcap=None,
                        need_raw_lse=False, config=None):
    """fp32 (grad_hidden [N, D] | None, grad_weight [V, D] | None, grad_bias [V] | None)."""
    n, d = student_hidden.shape
    v = weight.shape[0]
    d_t = teacher_hidden.shape[1]
    mode = MODES[divergence]
    need_grad_bias = need_grad_bias and student_bias is not None
    device = student_hidden.device
    dummy = torch.zeros(1, dtype=torch.float32, device=device)
    grad_hidden = torch.zeros((n, d), dtype=torch.float32, device=device) if need_grad_hidden else None
    grad_weight = torch.zeros((v, d), dtype=torch.float32, device=device) if need_grad_weight else None
    grad_bias = torch.zeros(v, dtype=torch.float32, device=device) if need_grad_bias else None
    if not (need_grad_hidden or need_grad_weight or need_grad_bias):
        return grad_hidden, grad_weight, grad_bias
    need_raw = bool(need_raw_lse) and grad_raw_lse is not None
    heavy = heavy_options(student_bias, teacher_bias, student_softcap, teacher_softcap, need_raw)
    aligned = aligned_for_vector_loads(student_hidden, teacher_hidden, weight, teacher_weight)
    cfg = dict(config or backward_config(n, max(d, d_t), v, weight.dtype, heavy=heavy, aligned=aligned))
    flags = kernel_flags(weight, teacher_weight, student_bias, teacher_bias, student_softcap, teacher_softcap)
    scalars = scalar_args(temperature, student_scale, teacher_scale, student_softcap, teacher_softcap, beta)
    grid = (triton.cdiv(n, cfg["BT"]), triton.cdiv(v, cfg["BV"]))
    divergence_backward_kernel[grid](
        student_hidden, teacher_hidden, weight, weight if teacher_weight is None else teacher_weight,
        weight if student_bias is None else student_bias, weight if teacher_bias is None else teacher_bias,
        stats, grad_loss, grad_raw_lse if need_raw else grad_loss,
        dummy if grad_hidden is None else grad_hidden, dummy if grad_weight is None else grad_weight,
        dummy if grad_bias is None else grad_bias,
        n, v, d, d_t, *scalars, 1.0 - float(beta),
        MODE=mode, NEED_RAW=need_raw, NEED_DH=need_grad_hidden, NEED_DW=need_grad_weight, NEED_DB=need_grad_bias,
        **flags, **cfg)
    return grad_hidden, grad_weight, grad_bias
