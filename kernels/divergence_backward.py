"""Backward of the fused linear divergence: gradients of the student hidden states, lm_head weight
and bias, recomputing each logits tile from the saved per-token statistics (no tokens x vocab
tensor in memory).

Per tile, from the recomputed logits and the saved max m and log Z of each side (stats_layout),
so that nothing large cancels at any logit scale (p = exp((x_s - m_s) - log Z_s), q likewise):

    reverse_kl : g = p (((x_s - m_s) - (x_t - m_t)) - (log Z_s - log Z_t) - KL)
    forward_kl : g = p - q
    jsd(beta)  : g = (1 - beta) p (log p - log m - KL(p||m))
    dL/dy = grad_loss g / T + grad_raw_lse softmax(y_s)          (y = T x, untempered capped logits;
            softmax(y_s) = exp((y_s - RAW_MAX) - RAW_LOG_Z))
    dL/da = dL/dy * scale * (1 - (y / cap)^2)                     (the last factor only with a softcap)

(p = 0 entries, from -inf logits, give g = 0: no 0 * -inf.) Then dh += dL/da W, dW += (dL/da)^T h
and db += column sums. Only the student side gets gradients. Two ways to sum them:

* default (`divergence_backward_kernel`): fp32 atomics (as Cut Cross-Entropy does; relaxed order,
  only atomicity matters), so every (token block, vocabulary tile) program is independent.
  8 N D V FLOPs (4 for the logits recompute, 2 each for dh and dW): forward + backward is the
  12 N D V floor of recompute. The price is N D (V / BV) + V D (N / BT) fp32 atomics (at Qwen3-8B
  scale, N 8192, D 4096, V 151,936, BT 64, BV 128: ~0.12 T element-RMWs) and an atomic order
  that differs run to run at the level of fp32 rounding.
* `deterministic=True` (`divergence_backward_owned_kernel`, launched once for dh and once for dW
  and db): every gradient tile has one owning program that loops over the other dimension in a
  fixed order (plain load/add/store), and split loops write per-split partials that are summed in
  split order: bitwise-identical results run to run, no float atomics. It recomputes the logits
  in both launches: 12 N D V FLOPs instead of 8. Extra memory: (splits_dh - 1) N D +
  (splits_dw - 1) (V D + V) fp32 partials (splits for about two waves of programs; at Qwen3-8B
  scale on 132 SMs splits_dh = 3, splits_dw = 1: 268 MB more than the atomic path's gradients).
  Its GPU time cost is not measured here (no GPU): benchmarks/gpu_check.py times it through the
  public API with deterministic=True.

Traffic, counted by /work/shared/tools/kernel_traffic.py (bf16, BT 64, BV 128, BK 64, N 128,
D 128, V 1024): atomic kernel 0.134 GFLOP, 3.43 MB loaded (0.92 MB distinct) and 1.57 MB stored
(each atomic counted as a load and a store; 3.42 MB loaded before the split-layout change, which
reads two more stats columns); deterministic (one split each) 0.201 GFLOP (1.5x), 4.51 MB loaded
(1.32x; 1.25 MB distinct) and the same 1.57 MB stored, as plain stores instead of atomics; with
(4, 2) splits the same bytes over 1.97 MB of distinct addresses, plus the torch sum of the partials.
Gradient filtering (skipping tiles whose |dL/da| is below bf16 resolution, as Cut Cross-Entropy
does) is the next step; it is not done here, so the result is exact.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .divergence_forward import (
    H100_SMS, MODES, _log_mixture, _student_teacher_logits, _times_log, aligned_for_vector_loads, gpu_tiles,
    heavy_options, interpreting, kernel_flags, scalar_args,
)
from .stats_layout import (
    GRAD_SHIFT, GRAD_SHIFT_LO, NUM_STATS, STUDENT_LOG_Z, STUDENT_MAX, STUDENT_RAW_LOG_Z, STUDENT_RAW_MAX, TEACHER_LOG_Z, TEACHER_MAX,
)



# the stats columns the kernels read, as compile-time constants of the shared layout
_STUDENT_MAX = tl.constexpr(STUDENT_MAX)
_STUDENT_LOG_Z = tl.constexpr(STUDENT_LOG_Z)
_TEACHER_MAX = tl.constexpr(TEACHER_MAX)
_TEACHER_LOG_Z = tl.constexpr(TEACHER_LOG_Z)
_GRAD_SHIFT = tl.constexpr(GRAD_SHIFT)
_GRAD_SHIFT_LO = tl.constexpr(GRAD_SHIFT_LO)
_STUDENT_RAW_MAX = tl.constexpr(STUDENT_RAW_MAX)
_STUDENT_RAW_LOG_Z = tl.constexpr(STUDENT_RAW_LOG_Z)
_NUM_STATS = tl.constexpr(NUM_STATS)


@triton.jit
def _gradient_tile(hs_ptr, ht_ptr, w_ptr, wt_ptr, bs_ptr, bt_ptr, stats_ptr, grad_loss_ptr, grad_raw_ptr,
                   rows, cols, row_ok, col_ok, D, DT,
                   s_scale, t_scale, s_cap, t_cap, inv_temp, temperature, log_1m_beta, log_beta, one_m_beta,
                   MODE: tl.constexpr, SHARED_W: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr,
                   HAS_SCAP: tl.constexpr, HAS_TCAP: tl.constexpr, NEED_RAW: tl.constexpr,
                   BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr,
                   PRECISION: tl.constexpr):
    """dL/da for a BT x BV tile (0 outside the problem), from the recomputed logits and the saved
    max and log Z of each side: p = exp((x_s - m_s) - log Z_s), and the log-ratio from max-shifted
    logits. Rows whose max is -inf (all -inf) use shift 0, so they come out NaN, not -inf - -inf."""
    # only y_s stays live: x_s = y_s / T is the same single multiply wherever it is used (registers)
    y_s, y_t = _student_teacher_logits(hs_ptr, ht_ptr, w_ptr, wt_ptr, bs_ptr, bt_ptr, rows, cols, row_ok, col_ok,
                                       D, DT, s_scale, t_scale, s_cap, t_cap,
                                       SHARED_W, HAS_BS, HAS_BT, HAS_SCAP, HAS_TCAP, BT, BV, BK, UPCAST, PRECISION)
    x_t = y_t * inv_temp
    row_stats = stats_ptr + rows * _NUM_STATS
    m_s = tl.load(row_stats + _STUDENT_MAX, mask=row_ok, other=0.0)
    log_z_s = tl.load(row_stats + _STUDENT_LOG_Z, mask=row_ok, other=0.0)
    m_t = tl.load(row_stats + _TEACHER_MAX, mask=row_ok, other=0.0)
    log_z_t = tl.load(row_stats + _TEACHER_LOG_Z, mask=row_ok, other=0.0)
    shift = tl.load(row_stats + _GRAD_SHIFT, mask=row_ok, other=0.0)
    shift_lo = tl.load(row_stats + _GRAD_SHIFT_LO, mask=row_ok, other=0.0)
    upstream = tl.load(grad_loss_ptr + rows, mask=row_ok, other=0.0) * inv_temp

    centred_s = y_s * inv_temp - tl.where(m_s == float("-inf"), 0.0, m_s)[:, None]
    centred_t = x_t - tl.where(m_t == float("-inf"), 0.0, m_t)[:, None]
    log_p = centred_s - log_z_s[:, None]
    p = tl.exp(log_p)
    if MODE == 0:
        # log p - log q = ((x_s - m_s) - (x_t - m_t)) - (log Z_s - log Z_t): no large values cancel
        # log p - log q - KL = (x_s - m_s) - (x_t - m_t) - A with A = (log Z_s - log Z_t) + KL kept
        # as hi + lo (TwoSum): where p is large the first difference is close to A_hi, so it cancels
        # exactly and no rounding at the size of the KL tilts the row's gradient
        delta_z = log_z_s - log_z_t
        a_hi = delta_z + shift
        a_back = a_hi - delta_z
        a_lo = ((delta_z - (a_hi - a_back)) + (shift - a_back)) + shift_lo
        g = _times_log(p, ((centred_s - centred_t) - a_hi[:, None]) - a_lo[:, None])
    elif MODE == 1:
        g = p - tl.exp(centred_t - log_z_t[:, None])
    else:
        log_m = _log_mixture(log_p, centred_t - log_z_t[:, None], log_1m_beta, log_beta)
        g = one_m_beta * _times_log(p, (log_p - log_m - shift[:, None]) - shift_lo[:, None])
    dy = g * upstream[:, None]
    if NEED_RAW:
        raw_max = tl.load(row_stats + _STUDENT_RAW_MAX, mask=row_ok, other=0.0)
        raw_log_z = tl.load(row_stats + _STUDENT_RAW_LOG_Z, mask=row_ok, other=0.0)
        grad_raw = tl.load(grad_raw_ptr + rows, mask=row_ok, other=0.0)
        # softmax(y_s) from the untempered logits themselves: y_s - RAW_MAX rounds once, as plain
        # fp32 does (T x_s would add the rounding of x_s = y_s / T: 2-3.6x the error at T = 0.3)
        dy += grad_raw[:, None] * tl.exp((y_s - raw_max[:, None]) - raw_log_z[:, None])
    if HAS_SCAP:
        capped = y_s * (1.0 / s_cap)  # tanh(z / cap) = y / cap
        dy = dy * (1.0 - capped * capped)
    return tl.where(row_ok[:, None] & col_ok[None, :], dy * s_scale, 0.0)


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
    """Gradient tile of BT tokens x BV vocabulary entries, scattered into dh [N, D], dW [V, D], db [V]
    with fp32 atomics (the default, non-deterministic backward).

    Stats columns read: STUDENT_MAX, STUDENT_LOG_Z, TEACHER_MAX, TEACHER_LOG_Z, GRAD_SHIFT (and the
    raw max / log Z). Grid (cdiv(N, BT), cdiv(V, BV)). Traffic per program: the logits recompute
    reads BT (D + Dt) hidden and BV (D [+ Dt]) weight elements; the scatter reads BV x D of W and
    BT x D of h_s again and does BT x D + BV x D fp32 atomic adds, so in all (V/BV) N D + (N/BT) V D
    atomics besides the reads of the forward.
    """
    pid_t = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_t * BT + tl.arange(0, BT)
    cols = pid_v * BV + tl.arange(0, BV)
    row_ok = rows < N
    col_ok = cols < V
    da = _gradient_tile(hs_ptr, ht_ptr, w_ptr, wt_ptr, bs_ptr, bt_ptr, stats_ptr, grad_loss_ptr, grad_raw_ptr,
                        rows, cols, row_ok, col_ok, D, DT,
                        s_scale, t_scale, s_cap, t_cap, inv_temp, temperature, log_1m_beta, log_beta, one_m_beta,
                        MODE, SHARED_W, HAS_BS, HAS_BT, HAS_SCAP, HAS_TCAP, NEED_RAW, BT, BV, BK, UPCAST, PRECISION)

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


@triton.jit
def divergence_backward_owned_kernel(
    hs_ptr, ht_ptr, w_ptr, wt_ptr, bs_ptr, bt_ptr, stats_ptr, grad_loss_ptr, grad_raw_ptr,
    out_ptr, db_ptr,
    N, V, D, DT, blocks_per_split,
    s_scale, t_scale, s_cap, t_cap, inv_temp, temperature, log_1m_beta, log_beta, one_m_beta,
    MODE: tl.constexpr, SHARED_W: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr,
    HAS_SCAP: tl.constexpr, HAS_TCAP: tl.constexpr, NEED_RAW: tl.constexpr,
    OWN_DH: tl.constexpr, NEED_DB: tl.constexpr,
    BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Deterministic backward, one gradient per launch, with no atomics: every output tile has one
    owning program, which sums its contributions in a fixed order by plain load/add/store.

    OWN_DH: grid (cdiv(N, BT), splits); program (t, s) loops over the vocabulary tiles of split s
    and accumulates its BT rows of dh into out[s] ([splits, N, D] fp32 partials, summed in split
    order by the launcher). Else (dW, db): grid (cdiv(V, BV), splits); program (v, s) loops over
    the token blocks of split s into out[s] ([splits, V, D]) and db_ptr[s] ([splits, V]).
    Traffic per program and tile: the logits recompute (as the atomic kernel), one BV x D read of W
    (or BT x D of h_s) and a BT x D (or BV x D) fp32 read-modify-write of its own partial.
    """
    pid_own = tl.program_id(0)
    pid_s = tl.program_id(1)
    if OWN_DH:
        rows = pid_own * BT + tl.arange(0, BT)
        row_ok = rows < N
        num_blocks = tl.cdiv(V, BV)
    else:
        cols = pid_own * BV + tl.arange(0, BV)
        col_ok = cols < V
        num_blocks = tl.cdiv(N, BT)
        db_acc = tl.zeros([BV], dtype=tl.float32)
    block_begin = pid_s * blocks_per_split
    block_end = tl.minimum(block_begin + blocks_per_split, num_blocks)
    for block in range(block_begin, block_end):
        if OWN_DH:
            cols = block * BV + tl.arange(0, BV)
            col_ok = cols < V
        else:
            rows = block * BT + tl.arange(0, BT)
            row_ok = rows < N
        da = _gradient_tile(hs_ptr, ht_ptr, w_ptr, wt_ptr, bs_ptr, bt_ptr, stats_ptr, grad_loss_ptr, grad_raw_ptr,
                            rows, cols, row_ok, col_ok, D, DT,
                            s_scale, t_scale, s_cap, t_cap, inv_temp, temperature, log_1m_beta, log_beta,
                            one_m_beta, MODE, SHARED_W, HAS_BS, HAS_BT, HAS_SCAP, HAS_TCAP, NEED_RAW,
                            BT, BV, BK, UPCAST, PRECISION)
        if UPCAST:
            da_in = da
        else:
            da_in = da.to(hs_ptr.dtype.element_ty)
        if OWN_DH:
            for k0 in range(0, D, BK):
                ks = k0 + tl.arange(0, BK)
                k_ok = ks < D
                w = tl.load(w_ptr + cols[:, None] * D + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                if UPCAST:
                    w = w.to(tl.float32)
                dst = out_ptr + (pid_s * N + rows[:, None]) * D + ks[None, :]
                dst_ok = row_ok[:, None] & k_ok[None, :]
                acc = tl.load(dst, mask=dst_ok, other=0.0)
                acc = tl.dot(da_in, w, acc, input_precision=PRECISION)
                tl.store(dst, acc, mask=dst_ok)
        else:
            if NEED_DB:
                db_acc += tl.sum(da, axis=0)
            for k0 in range(0, D, BK):
                ks = k0 + tl.arange(0, BK)
                k_ok = ks < D
                h = tl.load(hs_ptr + rows[:, None] * D + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                if UPCAST:
                    h = h.to(tl.float32)
                dst = out_ptr + (pid_s * V + cols[:, None]) * D + ks[None, :]
                dst_ok = col_ok[:, None] & k_ok[None, :]
                acc = tl.load(dst, mask=dst_ok, other=0.0)
                acc = tl.dot(tl.trans(da_in), h, acc, input_precision=PRECISION)
                tl.store(dst, acc, mask=dst_ok)
    if not OWN_DH:
        if NEED_DB:
            tl.store(db_ptr + pid_s * V + cols, db_acc, mask=col_ok)


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


def deterministic_splits(owners: int, blocks: int, sms: int = H100_SMS, interpret: bool | None = None) -> int:
    """Splits of the loop of the deterministic kernels: enough programs for about two waves, and
    no more (each split is one more fp32 partial of the gradient in memory)."""
    if interpret is None:
        interpret = interpreting()
    target = 1 if interpret else 2 * sms
    return max(1, min(blocks, triton.cdiv(target, owners)))


def _sum_in_order(partials: torch.Tensor) -> torch.Tensor:
    """Sum of [splits, ...] partials in split order (a fixed order: bitwise repeatable); one split
    is returned as it is (no copy)."""
    if partials.shape[0] == 1:
        return partials[0]
    total = partials[0].clone()
    for index in range(1, partials.shape[0]):
        total += partials[index]
    return total


def divergence_backward(student_hidden, teacher_hidden, weight, teacher_weight, student_bias, teacher_bias,
                        stats, grad_loss, grad_raw_lse, *, need_grad_hidden=True, need_grad_weight=True,
                        need_grad_bias=True, divergence="reverse_kl", beta=1.0, temperature=1.0,
                        student_scale=1.0, teacher_scale=1.0, student_softcap=None, teacher_softcap=None,
                        need_raw_lse=False, deterministic=False, config=None, splits=None):
    """fp32 (grad_hidden [N, D] | None, grad_weight [V, D] | None, grad_bias [V] | None).

    deterministic=False: one launch of divergence_backward_kernel (fp32 atomics, 8 N D V FLOPs).
    deterministic=True: no float atomics, bitwise-identical results run to run: one launch of
    divergence_backward_owned_kernel per gradient (dh, then dW and db), each recomputing the logits
    tiles, so 12 N D V FLOPs instead of 8, plus (splits_dh - 1) N D + (splits_dw - 1) (V D + V) fp32
    of partials when the loops are split (`splits` = (dh, dW) overrides the launcher's choice).
    """
    n, d = student_hidden.shape
    v = weight.shape[0]
    d_t = teacher_hidden.shape[1]
    mode = MODES[divergence]
    need_grad_bias = need_grad_bias and student_bias is not None
    device = student_hidden.device
    if not (need_grad_hidden or need_grad_weight or need_grad_bias):
        return None, None, None
    need_raw = bool(need_raw_lse) and grad_raw_lse is not None
    heavy = heavy_options(student_bias, teacher_bias, student_softcap, teacher_softcap, need_raw)
    aligned = aligned_for_vector_loads(student_hidden, teacher_hidden, weight, teacher_weight)
    cfg = dict(config or backward_config(n, max(d, d_t), v, weight.dtype, heavy=heavy, aligned=aligned))
    flags = kernel_flags(weight, teacher_weight, student_bias, teacher_bias, student_softcap, teacher_softcap)
    scalars = scalar_args(temperature, student_scale, teacher_scale, student_softcap, teacher_softcap, beta)
    inputs = (student_hidden, teacher_hidden, weight, weight if teacher_weight is None else teacher_weight,
              weight if student_bias is None else student_bias, weight if teacher_bias is None else teacher_bias,
              stats, grad_loss, grad_raw_lse if need_raw else grad_loss)
    token_blocks, vocab_tiles = triton.cdiv(n, cfg["BT"]), triton.cdiv(v, cfg["BV"])
    dummy = torch.zeros(1, dtype=torch.float32, device=device)

    if not deterministic:
        grad_hidden = torch.zeros((n, d), dtype=torch.float32, device=device) if need_grad_hidden else None
        grad_weight = torch.zeros((v, d), dtype=torch.float32, device=device) if need_grad_weight else None
        grad_bias = torch.zeros(v, dtype=torch.float32, device=device) if need_grad_bias else None
        divergence_backward_kernel[(token_blocks, vocab_tiles)](
            *inputs, dummy if grad_hidden is None else grad_hidden, dummy if grad_weight is None else grad_weight,
            dummy if grad_bias is None else grad_bias, n, v, d, d_t, *scalars, 1.0 - float(beta),
            MODE=mode, NEED_RAW=need_raw, NEED_DH=need_grad_hidden, NEED_DW=need_grad_weight,
            NEED_DB=need_grad_bias, **flags, **cfg)
        return grad_hidden, grad_weight, grad_bias

    sms = H100_SMS
    if student_hidden.is_cuda:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    split_dh, split_dw = splits or (deterministic_splits(token_blocks, vocab_tiles, sms),
                                    deterministic_splits(vocab_tiles, token_blocks, sms))
    grad_hidden = grad_weight = grad_bias = None

    def launch(own_dh, owners, blocks, split_count, out, db):
        per_split = triton.cdiv(blocks, split_count)
        split_count = triton.cdiv(blocks, per_split)
        divergence_backward_owned_kernel[(owners, split_count)](
            *inputs, out, db, n, v, d, d_t, per_split, *scalars, 1.0 - float(beta),
            MODE=mode, NEED_RAW=need_raw, OWN_DH=own_dh, NEED_DB=need_grad_bias and not own_dh, **flags, **cfg)
        return split_count

    if need_grad_hidden:
        count = triton.cdiv(vocab_tiles, triton.cdiv(vocab_tiles, split_dh))
        partial = torch.zeros((count, n, d), dtype=torch.float32, device=device)
        launch(True, token_blocks, vocab_tiles, count, partial, dummy)
        grad_hidden = _sum_in_order(partial)
    if need_grad_weight or need_grad_bias:
        count = triton.cdiv(token_blocks, triton.cdiv(token_blocks, split_dw))
        # without a weight gradient the dW partial is still the kernel's output (one split's worth)
        partial = torch.zeros((count, v, d), dtype=torch.float32, device=device)
        partial_db = torch.zeros((count, v), dtype=torch.float32, device=device) if need_grad_bias else dummy
        launch(False, vocab_tiles, token_blocks, count, partial, partial_db)
        grad_weight = _sum_in_order(partial) if need_grad_weight else None
        grad_bias = _sum_in_order(partial_db) if need_grad_bias else None
    return grad_hidden, grad_weight, grad_bias
