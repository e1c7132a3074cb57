"""Forward statistics of the fused linear divergence: per-token loss, split log-sum-exps (max and
log Z) and both entropies straight from hidden states and the lm_head weight, with no tokens x
vocab tensor in memory. Columns: kernels/stats_layout.py.

Per side, a logits tile is `x = cap(scale * (h W^T + b)) / T` (cap = c * tanh(./c) when a softcap
is given), computed in fp32 registers by a K-loop of tl.dot over the hidden size. One sweep over
the vocabulary keeps, per token and side, an online softmax whose sums are all taken relative to
the running max m (so nothing large ever cancels, at any logit scale):

    Z   = sum_v exp(x - m)                          -> log Z     (lse = m + log Z, never rounded)
    E   = sum_v exp(x - m) (x - m)                  -> entropy H = log Z - E / Z   (both sides)
    C   = sum_v exp(x_s - m_s) ((x_s - m_s) - (x_t - m_t))
                                                    -> reverse KL = C / Z_s - (log Z_s - log Z_t)
          (forward KL: the same with s and t swapped, weighted by the teacher)
    R   = sum_v exp(y_s - T m_s), y_s = T x_s       -> raw lse = T m_s + log R   (only if asked)

When the max grows, each sum is rescaled and its first moments moved by Z (m_old - m_new). -inf
logits (a banned-token bias) weigh 0 and never form 0 * -inf; a row that is all -inf is NaN by
contract; NaN and +inf propagate to their row. JSD needs log M = log(beta q + (1-beta) p), i.e.
the final max and log Z of both sides, before it can sum: it runs the same kernel a second time
(constexpr MODE = JSD_SECOND), which doubles its forward cost to 8 T D V FLOPs and twice the
weight/hidden reads. Reverse and forward KL take one sweep (4TDV).

Work split: grid = (token blocks, vocabulary splits). A token block of BT rows alone gives only
N / BT programs (16 for N = 1024, BT = 64, on a 132-SM H100), so the vocabulary is cut into
`splits` contiguous ranges of whole BV tiles, each program writes its partial (m, Z, E per side,
C, R) per row to a [splits, N, 8] fp32 buffer, and `_merge_partials` (a few torch ops on
[splits, N], in float64) rescales them to the row max and forms the loss from log Z's and means.
`splits` is chosen so that there are about two waves of programs (from the device's SM count);
with many tokens it is 1-3. Programs of one split sweep the same W tiles at the same time, so W is
read from DRAM about once per split wave and reused from L2 by the token blocks.

Cost, counted by /work/shared/tools/kernel_traffic.py (bf16, the GPU tiles BT 64, BV 128, BK 64,
one split): exactly the 4 N D V FLOPs of the two logits GEMMs; at N 256, D 256, V 2048 0.537
GFLOP and 8.39 MB loaded (1.31 MB distinct: each h row once per BV tile, each W tile once per
token block); at N 128, D 128, V 1024 0.067 GFLOP, 1.05 MB loaded (0.33 MB distinct), the same
before and after the split-layout change (the teacher-entropy sum is registers only; the partial
buffer grows from 7 to 8 fp32 per row and split). At BV 64 the loads grow by half.

Interpreter mode (TRITON_INTERPRET=1): bf16 arithmetic is not emulated correctly there, so the
launcher sets UPCAST and every tile is converted to fp32 right after loading.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .stats_layout import (
    GRAD_SHIFT, GRAD_SHIFT_LO, LOSS, NUM_STATS, STUDENT_ENTROPY, STUDENT_LOG_Z, STUDENT_MAX, STUDENT_RAW_LOG_Z,
    STUDENT_RAW_MAX, TEACHER_ENTROPY, TEACHER_LOG_Z, TEACHER_MAX,
)

REVERSE_KL, FORWARD_KL, JSD_FIRST, JSD_SECOND = 0, 1, 2, 3
MODES = {"reverse_kl": REVERSE_KL, "forward_kl": FORWARD_KL, "jsd": JSD_FIRST}
PARTIAL_COLUMNS = 8  # m_s, Z_s, m_t, Z_t, E_s, E_t, C, R
H100_SMS = 132


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------------------------------------
# shared tile helpers (also used by the backward kernel)
# ------------------------------------------------------------------------------------------------
@triton.jit
def _finish_logits(acc, b_ptr, cols, col_ok, scale, softcap,
                   HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr):
    """fp32 h W^T tile -> untempered logits y = cap(scale * (acc + b)) (the model's own)."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0)[None, :]
    z = acc * scale
    if HAS_CAP:
        # c * tanh(z / c) written with exp: tl has no tanh that also runs in the interpreter;
        # exp overflow gives the right limits (+-1).
        z = softcap * (1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0))
    return z


@triton.jit
def _logits_one_side(h_ptr, w_ptr, rows, cols, row_ok, col_ok, K,
                     BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """h[rows] @ W[cols]^T over the full hidden size K, fp32 accumulation."""
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < K
        h = tl.load(h_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _logits_shared_weight(hs_ptr, ht_ptr, w_ptr, rows, cols, row_ok, col_ok, K,
                          BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
                          UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Student and teacher h W^T tiles from ONE load of each W tile."""
    acc_s = tl.zeros([BT, BV], dtype=tl.float32)
    acc_t = tl.zeros([BT, BV], dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < K
        hk_mask = row_ok[:, None] & k_ok[None, :]
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        hs = tl.load(hs_ptr + rows[:, None] * K + ks[None, :], mask=hk_mask, other=0.0)
        ht = tl.load(ht_ptr + rows[:, None] * K + ks[None, :], mask=hk_mask, other=0.0)
        if UPCAST:
            w = w.to(tl.float32)
            hs = hs.to(tl.float32)
            ht = ht.to(tl.float32)
        wt = tl.trans(w)
        acc_s = tl.dot(hs, wt, acc_s, input_precision=PRECISION)
        acc_t = tl.dot(ht, wt, acc_t, input_precision=PRECISION)
    return acc_s, acc_t


@triton.jit
def _student_teacher_logits(hs_ptr, ht_ptr, w_ptr, wt_ptr, bs_ptr, bt_ptr, rows, cols, row_ok, col_ok,
                            D, DT, s_scale, t_scale, s_cap, t_cap,
                            SHARED_W: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr,
                            HAS_SCAP: tl.constexpr, HAS_TCAP: tl.constexpr,
                            BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
                            UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """The untempered fp32 logits tiles (y_s, y_t) for rows x cols; the callers temper them,
    x = y / T (the raw lse needs y_s itself: T x_s would round twice)."""
    if SHARED_W:
        acc_s, acc_t = _logits_shared_weight(hs_ptr, ht_ptr, w_ptr, rows, cols, row_ok, col_ok, D,
                                             BT, BV, BK, UPCAST, PRECISION)
    else:
        acc_s = _logits_one_side(hs_ptr, w_ptr, rows, cols, row_ok, col_ok, D, BT, BV, BK, UPCAST, PRECISION)
        acc_t = _logits_one_side(ht_ptr, wt_ptr, rows, cols, row_ok, col_ok, DT, BT, BV, BK, UPCAST, PRECISION)
    y_s = _finish_logits(acc_s, bs_ptr, cols, col_ok, s_scale, s_cap, HAS_BS, HAS_SCAP)
    y_t = _finish_logits(acc_t, bt_ptr, cols, col_ok, t_scale, t_cap, HAS_BT, HAS_TCAP)
    return y_s, y_t


@triton.jit
def _log_mixture(log_p, log_q, log_1m_beta, log_beta):
    """log(beta q + (1 - beta) p) from log p and log q, without overflow; -inf where both are -inf
    (the shift by 0 there avoids -inf - -inf)."""
    a = log_p + log_1m_beta
    b = log_q + log_beta
    top = tl.maximum(a, b)
    top = tl.where(top == float("-inf"), 0.0, top)
    return top + tl.log(tl.exp(a - top) + tl.exp(b - top))


@triton.jit
def _times_log(weight, log_value):
    """weight * log_value, 0 where the weight (a probability) is 0: a -inf logit or a masked
    column never forms 0 * -inf or 0 * (-inf - -inf). NaN and +inf weights still propagate."""
    return tl.where(weight == 0.0, 0.0, weight * log_value)


@triton.jit
def _online_update(m, z, e, x, valid):
    """One tile of an online softmax over a row: max m, Z = sum exp(x - m) and the shifted first
    moment E = sum exp(x - m) (x - m), rescaled to the new max. Returns (new m, the shift used,
    alpha, Z, E, x - shift, exp(x - shift)). A row that is -inf so far shifts by 0 (no -inf - -inf)."""
    x = tl.where(valid, x, float("-inf"))
    new_m = tl.maximum(m, tl.max(x, axis=1))
    shift = tl.where(new_m == float("-inf"), 0.0, new_m)
    alpha = tl.exp(m - shift)
    centred = x - shift[:, None]
    weight = tl.exp(centred)  # 0 on invalid columns and -inf logits
    # old terms: exp(x - shift) (x - shift) = alpha exp(x - m) ((x - m) + (m - shift)); z == 0 rows
    # (nothing seen yet) have m = -inf and must not form 0 * inf
    moved = tl.where(z > 0.0, z * (m - shift), 0.0)
    e = alpha * (e + moved) + tl.sum(_times_log(weight, centred), axis=1)
    z = alpha * z + tl.sum(weight, axis=1)
    return new_m, shift, alpha, z, e, centred, weight


# ------------------------------------------------------------------------------------------------
# the statistics kernel
# ------------------------------------------------------------------------------------------------
@triton.jit
def divergence_stats_kernel(
    hs_ptr, ht_ptr, w_ptr, wt_ptr, bs_ptr, bt_ptr, row_ptr, part_ptr,
    N, V, D, DT, tiles_per_split,
    s_scale, t_scale, s_cap, t_cap, inv_temp, temperature, log_1m_beta, log_beta,
    MODE: tl.constexpr, SHARED_W: tl.constexpr, HAS_BS: tl.constexpr, HAS_BT: tl.constexpr,
    HAS_SCAP: tl.constexpr, HAS_TCAP: tl.constexpr, NEED_RAW: tl.constexpr,
    BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Partial per-token statistics of BT tokens over one vocabulary split.

    Grid (cdiv(N, BT), splits). MODE 0/1/2 (reverse KL / forward KL / JSD first sweep) write
    (m_s, Z_s, m_t, Z_t, E_s, E_t, C, R) to part[split, row, :8], every sum taken relative to the
    running max (E = sum e^(x-m) (x-m), C = the cross term from max-shifted logits, R the raw-lse
    sum); MODE 3 (JSD second sweep) reads the final (m_s, log Z_s, m_t, log Z_t) from row_ptr [N, 4]
    and writes (KL(p||m), KL(q||m)) to part[split, row, :2].
    Traffic per program: its BT rows of h_s and h_t (D + Dt elements each) once per BV tile, and
    each W (and W_t) tile of its split once, i.e. (N/BT) x (V D [+ V Dt]) weight elements in all,
    plus 8 fp32 per row and split written.
    """
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_t * BT + tl.arange(0, BT)
    row_ok = rows < N
    tile_begin = pid_s * tiles_per_split
    num_tiles = tl.cdiv(V, BV)
    tile_end = tl.minimum(tile_begin + tiles_per_split, num_tiles)

    if MODE == 3:
        m_s = tl.load(row_ptr + rows * 4 + 0, mask=row_ok, other=0.0)
        log_z_s = tl.load(row_ptr + rows * 4 + 1, mask=row_ok, other=0.0)
        m_t = tl.load(row_ptr + rows * 4 + 2, mask=row_ok, other=0.0)
        log_z_t = tl.load(row_ptr + rows * 4 + 3, mask=row_ok, other=0.0)
        kl_pm = tl.zeros([BT], dtype=tl.float32)
        kl_qm = tl.zeros([BT], dtype=tl.float32)
    else:
        m_s = tl.full([BT], float("-inf"), dtype=tl.float32)
        m_t = tl.full([BT], float("-inf"), dtype=tl.float32)
        z_s = tl.zeros([BT], dtype=tl.float32)
        z_t = tl.zeros([BT], dtype=tl.float32)
        e_s = tl.zeros([BT], dtype=tl.float32)
        e_t = tl.zeros([BT], dtype=tl.float32)
        cross = tl.zeros([BT], dtype=tl.float32)
        raw = tl.zeros([BT], dtype=tl.float32)

    for tile in range(tile_begin, tile_end):
        cols = tile * BV + tl.arange(0, BV)
        col_ok = cols < V
        y_s, y_t = _student_teacher_logits(hs_ptr, ht_ptr, w_ptr, wt_ptr, bs_ptr, bt_ptr, rows, cols, row_ok,
                                           col_ok, D, DT, s_scale, t_scale, s_cap, t_cap,
                                           SHARED_W, HAS_BS, HAS_BT, HAS_SCAP, HAS_TCAP, BT, BV, BK,
                                           UPCAST, PRECISION)
        x_s, x_t = y_s * inv_temp, y_t * inv_temp
        valid = col_ok[None, :]
        if MODE == 3:
            m_s_safe = tl.where(m_s == float("-inf"), 0.0, m_s)
            m_t_safe = tl.where(m_t == float("-inf"), 0.0, m_t)
            log_p = tl.where(valid, (x_s - m_s_safe[:, None]) - log_z_s[:, None], float("-inf"))
            log_q = tl.where(valid, (x_t - m_t_safe[:, None]) - log_z_t[:, None], float("-inf"))
            log_m = _log_mixture(log_p, log_q, log_1m_beta, log_beta)
            kl_pm += tl.sum(_times_log(tl.exp(log_p), log_p - log_m), axis=1)
            kl_qm += tl.sum(_times_log(tl.exp(log_q), log_q - log_m), axis=1)
        else:
            old_shift_s = tl.where(m_s == float("-inf"), 0.0, m_s)
            old_shift_t = tl.where(m_t == float("-inf"), 0.0, m_t)
            m_s_old = m_s
            z_s_old = z_s
            z_t_old = z_t
            m_s, shift_s, alpha_s, z_s, e_s, cs, p = _online_update(m_s, z_s, e_s, x_s, valid)
            m_t, shift_t, alpha_t, z_t, e_t, ct, q = _online_update(m_t, z_t, e_t, x_t, valid)
            if MODE == 0:
                # sum e^(xs-ms) ((xs-ms) - (xt-mt)); the old terms move by (old ms - new ms) - (old mt - new mt)
                moved = tl.where(z_s_old > 0.0, z_s_old * ((old_shift_s - shift_s) - (old_shift_t - shift_t)), 0.0)
                cross = alpha_s * (cross + moved) + tl.sum(_times_log(p, cs - ct), axis=1)
            if MODE == 1:
                moved = tl.where(z_t_old > 0.0, z_t_old * ((old_shift_t - shift_t) - (old_shift_s - shift_s)), 0.0)
                cross = alpha_t * (cross + moved) + tl.sum(_times_log(q, ct - cs), axis=1)
            if NEED_RAW:
                # R = sum exp(y_s - T m_s): the untempered logits' sum relative to T m_s, each term's
                # exponent rounded once (fma: T m_s exact inside), as the plain fp32 lse rounds y_s
                raw_terms = tl.where(valid, tl.exp(tl.fma(-temperature, shift_s[:, None], y_s)), 0.0)
                raw = raw * tl.exp(temperature * (m_s_old - shift_s)) + tl.sum(raw_terms, axis=1)

    out = part_ptr + (pid_s * N + rows) * 8
    if MODE == 3:
        tl.store(out + 0, kl_pm, mask=row_ok)
        tl.store(out + 1, kl_qm, mask=row_ok)
    else:
        tl.store(out + 0, m_s, mask=row_ok)
        tl.store(out + 1, z_s, mask=row_ok)
        tl.store(out + 2, m_t, mask=row_ok)
        tl.store(out + 3, z_t, mask=row_ok)
        tl.store(out + 4, e_s, mask=row_ok)
        tl.store(out + 5, e_t, mask=row_ok)
        tl.store(out + 6, cross, mask=row_ok)
        tl.store(out + 7, raw, mask=row_ok)


# ------------------------------------------------------------------------------------------------
# launch configuration
# ------------------------------------------------------------------------------------------------
def _pow2_at_most(value: int, cap: int, floor: int = 16) -> int:
    return max(floor, min(cap, triton.next_power_of_2(max(int(value), 1))))


def gpu_tiles(aligned: bool, heavy: bool, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The sm_90-checked tiles shared by both kernels (see forward_config). fp32 inputs take BV 64 x
    BK 32: their tiles are twice the bytes, and 3xTF32 triples the MMA work and its temporaries."""
    if dtype == torch.float32:
        return dict(BT=64, BV=64, BK=32, num_warps=8, num_stages=3)
    if aligned:
        return dict(BT=64, BV=128, BK=64, num_warps=8, num_stages=3)
    return dict(BT=64, BV=64 if heavy else 128, BK=32, num_warps=8, num_stages=3)


def forward_config(n: int, d: int, v: int, dtype: torch.dtype, *, heavy: bool = False, aligned: bool = True,
                   interpret: bool | None = None, sms: int = H100_SMS) -> dict:
    """Tile shape, warps and vocabulary splits of the statistics kernel.

    GPU (read off the sm_90 SASS, see sm90_report): BT 64 x BV 128 at 8 warps, 3 stages. With the
    hidden sizes divisible by 16 (every real model) the loads vectorise and pipeline (cp.async) and
    BK 64 (128-byte rows, the widest swizzle) fits with HGMMA and no spills, every option included;
    BT 128 spills (two 128 x 128 fp32 tiles), BT < 64 loses wgmma. Unaligned hidden sizes get
    scalar loads and more registers: BK 32, and BV 64 when `heavy` (a bias, a softcap or the raw
    lse in play), where BV 128 spills. Interpreter: large blocks, its cost is per tile-operation.
    """
    if interpret is None:
        interpret = interpreting()
    if interpret:
        block_t = _pow2_at_most(n, 64)
        # ~64K-element tiles: few, large numpy operations
        config = dict(BT=block_t, BV=_pow2_at_most(v, max(512, 65536 // block_t)), BK=_pow2_at_most(d, 256),
                      num_warps=4, num_stages=1)
    else:
        config = gpu_tiles(aligned, heavy, dtype)
    token_blocks = triton.cdiv(n, config["BT"])
    vocab_tiles = triton.cdiv(v, config["BV"])
    target = 2 * sms if not interpret else 1
    splits = max(1, min(vocab_tiles, triton.cdiv(target, token_blocks)))
    config["tiles_per_split"] = triton.cdiv(vocab_tiles, splits)
    config["splits"] = triton.cdiv(vocab_tiles, config["tiles_per_split"])
    return config


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to tf32 (10-bit mantissa) on the GPU; 3xTF32 keeps ~fp32
    # accuracy on the tensor cores, where "ieee" would fall back to FMA (no HGMMA, and it spills)
    return "tf32x3" if dtype == torch.float32 else "tf32"


def heavy_options(student_bias, teacher_bias, student_softcap, teacher_softcap, need_raw_lse) -> bool:
    """Options that add live tile temporaries (and registers) to both kernels."""
    optional = (student_bias, teacher_bias, student_softcap, teacher_softcap)
    return any(x is not None for x in optional) or bool(need_raw_lse)


def aligned_for_vector_loads(*tensors) -> bool:
    """What the JIT's 16-divisibility specialisation will see: row strides and base addresses."""
    return all(t is None or (t.shape[-1] % 16 == 0 and t.data_ptr() % 16 == 0) for t in tensors)


def kernel_flags(weight, teacher_weight, student_bias, teacher_bias, student_softcap, teacher_softcap):
    """The constexpr switches both kernels share."""
    return dict(SHARED_W=teacher_weight is None, HAS_BS=student_bias is not None, HAS_BT=teacher_bias is not None,
                HAS_SCAP=student_softcap is not None, HAS_TCAP=teacher_softcap is not None,
                UPCAST=interpreting(), PRECISION=_precision(weight.dtype))


def scalar_args(temperature, student_scale, teacher_scale, student_softcap, teacher_softcap, beta):
    """Runtime float arguments, in kernel order (s_scale, t_scale, s_cap, t_cap, inv_temp, T, log(1-b), log b)."""
    log_1m_beta = math.log(1.0 - beta) if beta < 1.0 else 0.0
    log_beta = math.log(beta) if beta > 0.0 else 0.0
    return (float(student_scale), float(teacher_scale), float(student_softcap or 1.0), float(teacher_softcap or 1.0),
            1.0 / float(temperature), float(temperature), log_1m_beta, log_beta)


def _shift(top: torch.Tensor) -> torch.Tensor:
    """The max a row's sums are taken relative to: the max itself, 0 for a row that is all -inf."""
    return torch.where(top == float("-inf"), torch.zeros_like(top), top)


def _merge_partials(part: torch.Tensor, mode: int, temperature: float, need_raw: bool) -> dict:
    """[splits, N, 8] partial sums (each relative to its split's max) -> per-row statistics, in
    float64: the splits are rescaled to the row max exactly (no fp32 rounding of the rescale
    factors or of the moved first moments), and the loss is formed from log Z's and the shifted
    means only (never a difference of two large log-sum-exps). Returns a dict of float64 [N]."""
    m_s, z_s, m_t, z_t, e_s, e_t, cross, raw = part.double().unbind(-1)
    top_s, top_t = m_s.max(0).values, m_t.max(0).values
    shift_s, shift_t = _shift(top_s), _shift(top_t)
    split_s, split_t = _shift(m_s), _shift(m_t)
    w_s, w_t = torch.exp(split_s - shift_s), torch.exp(split_t - shift_t)
    zero = torch.zeros_like(z_s)
    sum_s, sum_t = (z_s * w_s).sum(0), (z_t * w_t).sum(0)
    moved_s = torch.where(z_s > 0, z_s * (split_s - shift_s), zero)
    moved_t = torch.where(z_t > 0, z_t * (split_t - shift_t), zero)
    log_z_s, log_z_t = torch.log(sum_s), torch.log(sum_t)
    out = dict(m_s=top_s, log_z_s=log_z_s, m_t=top_t, log_z_t=log_z_t,
               entropy_s=log_z_s - (w_s * (e_s + moved_s)).sum(0) / sum_s,
               entropy_t=log_z_t - (w_t * (e_t + moved_t)).sum(0) / sum_t)
    if mode == REVERSE_KL:
        moved = torch.where(z_s > 0, z_s * ((split_s - shift_s) - (split_t - shift_t)), zero)
        out["loss"] = (w_s * (cross + moved)).sum(0) / sum_s - (log_z_s - log_z_t)
    elif mode == FORWARD_KL:
        moved = torch.where(z_t > 0, z_t * ((split_t - shift_t) - (split_s - shift_s)), zero)
        out["loss"] = (w_t * (cross + moved)).sum(0) / sum_t - (log_z_t - log_z_s)
    if need_raw:
        # the kernel summed exp(T (x_s - m_s)) with T as the fp32 it received; T m_s is exact in
        # float64, and its fp32 rounding error goes into log Z so that RAW_MAX + RAW_LOG_Z is exact
        t32 = float(torch.tensor(temperature, dtype=torch.float32))
        raw_sum = (raw * torch.exp(t32 * (m_s - top_s).nan_to_num(nan=float("-inf"), neginf=float("-inf")))).sum(0)
        raw_max = t32 * top_s
        out["raw_max"] = raw_max
        out["raw_log_z"] = torch.log(raw_sum) + (raw_max - raw_max.float().double()).nan_to_num(0.0)
    return out


def divergence_forward(student_hidden, teacher_hidden, weight, teacher_weight=None, student_bias=None,
                       teacher_bias=None, *, divergence="reverse_kl", beta=1.0, temperature=1.0,
                       student_scale=1.0, teacher_scale=1.0, student_softcap=None, teacher_softcap=None,
                       need_raw_lse=False, deterministic=False, config=None):
    """Per-token statistics, fp32 [N, NUM_STATS] (columns in stats_layout), from contiguous 2-D
    inputs. Deterministic whatever `deterministic` says (no atomics: each program owns its rows of
    one split, and the merge is a fixed-order torch reduction)."""
    del deterministic
    n, d = student_hidden.shape
    v = weight.shape[0]
    d_t = teacher_hidden.shape[1]
    mode = MODES[divergence]
    heavy = heavy_options(student_bias, teacher_bias, student_softcap, teacher_softcap, need_raw_lse)
    sms = H100_SMS
    if student_hidden.is_cuda:
        sms = torch.cuda.get_device_properties(student_hidden.device).multi_processor_count
    aligned = aligned_for_vector_loads(student_hidden, teacher_hidden, weight, teacher_weight)
    cfg = dict(config or forward_config(n, max(d, d_t), v, weight.dtype, heavy=heavy, aligned=aligned, sms=sms))
    splits, tiles_per_split = cfg.pop("splits"), cfg.pop("tiles_per_split")
    flags = kernel_flags(weight, teacher_weight, student_bias, teacher_bias, student_softcap, teacher_softcap)
    scalars = scalar_args(temperature, student_scale, teacher_scale, student_softcap, teacher_softcap, beta)
    device = student_hidden.device
    part = torch.empty((splits, n, PARTIAL_COLUMNS), dtype=torch.float32, device=device)
    w_t = weight if teacher_weight is None else teacher_weight
    b_s = weight if student_bias is None else student_bias  # any pointer: never read without HAS_BS
    b_t = weight if teacher_bias is None else teacher_bias
    grid = (triton.cdiv(n, cfg["BT"]), splits)

    def launch(mode_now, row_stats):
        divergence_stats_kernel[grid](
            student_hidden, teacher_hidden, weight, w_t, b_s, b_t, row_stats, part,
            n, v, d, d_t, tiles_per_split, *scalars,
            MODE=mode_now, NEED_RAW=bool(need_raw_lse) and mode_now != JSD_SECOND, **flags, **cfg)

    launch(mode, part)  # row_ptr unused outside the second JSD sweep
    merged = _merge_partials(part, mode, temperature, need_raw_lse)
    stats = torch.zeros((n, NUM_STATS), dtype=torch.float64, device=device)
    stats[:, STUDENT_MAX], stats[:, STUDENT_LOG_Z] = merged["m_s"], merged["log_z_s"]
    stats[:, TEACHER_MAX], stats[:, TEACHER_LOG_Z] = merged["m_t"], merged["log_z_t"]
    stats[:, STUDENT_ENTROPY], stats[:, TEACHER_ENTROPY] = merged["entropy_s"], merged["entropy_t"]
    if mode == REVERSE_KL:
        stats[:, LOSS] = stats[:, GRAD_SHIFT] = merged["loss"]
    elif mode == FORWARD_KL:
        stats[:, LOSS] = merged["loss"]
    else:
        # the second sweep forms p, q from the stored (fp32) max and log Z, as the backward will
        row_stats = stats[:, [STUDENT_MAX, STUDENT_LOG_Z, TEACHER_MAX, TEACHER_LOG_Z]].float().contiguous()
        launch(JSD_SECOND, row_stats)
        kl_pm, kl_qm = part[:, :, 0].double().sum(0), part[:, :, 1].double().sum(0)
        stats[:, LOSS] = beta * kl_qm + (1.0 - beta) * kl_pm
        stats[:, GRAD_SHIFT] = kl_pm
    if need_raw_lse:
        stats[:, STUDENT_RAW_MAX], stats[:, STUDENT_RAW_LOG_Z] = merged["raw_max"], merged["raw_log_z"]
    # the gradient shift as hi + lo: a KL of ~40 rounded to fp32 alone would tilt the gradient
    stats[:, GRAD_SHIFT_LO] = stats[:, GRAD_SHIFT] - stats[:, GRAD_SHIFT].float().double()
    return stats.float()
