// Per-row element-wise passes of the fused epilogue, over one block of a logits row.
//
// Each routine reads a student row `xs` and a teacher row `xt` of the same vocabulary block
// (fp32, just produced by the GEMM and still in cache) and is vectorised over the block with
// `#pragma omp simd`; rows are independent, so callers run them in parallel over rows.
// Block partial sums are fp32 (a block is a few thousand entries) and are merged across blocks
// in double, relative to running maxima, like an online softmax. Every probability, log-ratio and
// gradient shift is formed from max-shifted logits (x - max, exact for the entries that carry the
// mass), never from a whole log-sum-exp rounded to fp32: that is what keeps logits ~1e4 exact.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "fused_divergence.h"
#include "stats_layout.h"
#include "vec_math.h"

namespace crisp_native {

// raw GEMM output a (without bias) -> tempered logit x = cap_fn((a + bias) * scale) / T, in place
inline void transform_row(float* row, const float* bias, int64_t n, float scale, float softcap, float inv_temperature) {
  if (softcap > 0.0f) {
    const float inv_cap = 1.0f / softcap;
    if (bias) {
#pragma omp simd
      for (int64_t v = 0; v < n; ++v) row[v] = softcap * fast_tanh((row[v] + bias[v]) * scale * inv_cap) * inv_temperature;
    } else {
#pragma omp simd
      for (int64_t v = 0; v < n; ++v) row[v] = softcap * fast_tanh(row[v] * scale * inv_cap) * inv_temperature;
    }
  } else if (bias) {
#pragma omp simd
    for (int64_t v = 0; v < n; ++v) row[v] = (row[v] + bias[v]) * scale * inv_temperature;
  } else if (scale * inv_temperature != 1.0f) {
    const float factor = scale * inv_temperature;
#pragma omp simd
    for (int64_t v = 0; v < n; ++v) row[v] *= factor;
  }
}

// The row's maximum and whether it holds a NaN. Two plain reductions (max, +) so that the loop
// vectorises: a `||` reduction on a bool, or NaN tests inside the max, leave GCC with scalar code
// (measured: the statistics pass was 27% of a D = 256 forward+backward, 10x the gradient pass).
inline float row_max(const float* row, int64_t n) {
  float best = -std::numeric_limits<float>::infinity();
  int32_t nans = 0;
#pragma omp simd reduction(max : best) reduction(+ : nans)
  for (int64_t v = 0; v < n; ++v) {
    best = row[v] > best ? row[v] : best;
    nans += row[v] != row[v];
  }
  return nans ? std::numeric_limits<float>::quiet_NaN() : best;
}

// Running statistics of one row over the vocabulary blocks seen so far, every sum relative to
// the running maxima ms, mt (us = xs - ms, ut = xt - mt, so each summand is small where it
// matters even for logits ~1e4):
//   zs = sum e^us,  cs = sum e^us us,  ds = sum e^us (us - ut),  zy = sum e^{T us} (untempered),
//   zt = sum e^ut,  ct = sum e^ut ut,  dt = sum e^ut (ut - us).
// Then log Z = log z, H = log z - c / z, KL(p||q) = ds / zs - (log zs - log zt), KL(q||p) alike.
struct RowState {
  double ms = -INFINITY, zs = 0, cs = 0, ds = 0, zy = 0;
  double mt = -INFINITY, zt = 0, ct = 0, dt = 0;
  bool poisoned = false;  // a NaN or +inf logit: every statistic of the row becomes NaN
};

// One block's contribution to a row, then merged into `state`. The fp32 partial sums run over
// sub-blocks of kSumSpan entries (a short fp32 sum per SIMD lane) and are added up in double.
// 128 entries: 16 fp32 terms per AVX2 lane before the double merge. 512 left H = log Z - c / Z
// (a difference of two near-equal terms for peaked rows) at 3x the plain error at T = 0.05.
constexpr int64_t kSumSpan = 128;
enum BlockSum { kZs = 0, kCs, kDs, kZy, kZt, kCt, kDt, kNumBlockSums };

// e * u with e = exp(u): 0 where e is 0 (u may be -inf there; 0 * -inf must not become NaN)
#pragma omp declare simd notinbranch
static inline float weighted(float e, float u) { return e == 0.0f ? 0.0f : e * u; }

// The fp32 sums of one block relative to the references ref_s, ref_t (see RowState), added to
// `sums` in double. One instantiation per divergence so that the SIMD loop has no branches in it.
template <bool kReverse, bool kForward, bool kRaw>
inline void block_sums(const float* xs, const float* xt, int64_t n, float ref_s, float ref_t, float temperature,
                       double* sums) {
  for (int64_t start = 0; start < n; start += kSumSpan) {
    const int64_t stop = std::min(n, start + kSumSpan);
    // The entries at the block's maximum (u == 0) add exactly 1 each: they are counted apart
    // (ns, nt), so that the fp32 sums hold only the tail, which a 1 next to it would absorb (at
    // p_max ~ 1 - 1e-7 the whole tail is below half an fp32 ulp of 1, and the entropy is that tail).
    float zs_f = 0, cs_f = 0, ds_f = 0, zy_f = 0, zt_f = 0, ct_f = 0, dt_f = 0, ns_f = 0, nt_f = 0;
#pragma omp simd reduction(+ : zs_f, cs_f, ds_f, zy_f, zt_f, ct_f, dt_f, ns_f, nt_f)
    for (int64_t v = start; v < stop; ++v) {
      const float us = xs[v] - ref_s, ut = xt[v] - ref_t;
      const float es = fast_exp(us), et = fast_exp(ut);
      const bool top_s = us == 0.0f, top_t = ut == 0.0f;
      zs_f += top_s ? 0.0f : es;
      ns_f += top_s ? 1.0f : 0.0f;
      cs_f += weighted(es, us);
      zt_f += top_t ? 0.0f : et;
      nt_f += top_t ? 1.0f : 0.0f;
      ct_f += weighted(et, ut);
      if (kReverse) ds_f += weighted(es, us - ut);
      if (kForward) dt_f += weighted(et, ut - us);
      if (kRaw) zy_f += top_s ? 0.0f : fast_exp(temperature * us);
    }
    sums[kZs] += double(zs_f) + double(ns_f), sums[kCs] += cs_f, sums[kDs] += ds_f;
    if (kRaw) sums[kZy] += double(zy_f) + double(ns_f);
    sums[kZt] += double(zt_f) + double(nt_f), sums[kCt] += ct_f, sums[kDt] += dt_f;
  }
}

// a * x, but 0 where the weight a is 0 (x may be infinite: a KL that is +inf on a part of the
// row whose weight underflowed)
static inline double scaled(double a, double x) { return a == 0.0 ? 0.0 : a * x; }

inline void accumulate_block(const float* xs, const float* xt, int64_t n, Divergence divergence, float temperature,
                             bool need_raw, RowState& state) {
  const float max_s = row_max(xs, n), max_t = row_max(xt, n);
  if (max_s != max_s || max_t != max_t || max_s == INFINITY || max_t == INFINITY) {
    state.poisoned = true;
    return;
  }
  const bool raw = need_raw && temperature != 1.0f;
  // a side whose block logits are all -inf adds nothing to that side's sums (its e^u are all 0)
  const bool block_s = max_s != -INFINITY, block_t = max_t != -INFINITY;
  const float ref_s = block_s ? max_s : 0.0f, ref_t = block_t ? max_t : 0.0f;
  double b[kNumBlockSums] = {0, 0, 0, 0, 0, 0, 0};
  if (divergence == kReverseKL) {
    if (raw) block_sums<true, false, true>(xs, xt, n, ref_s, ref_t, temperature, b);
    else block_sums<true, false, false>(xs, xt, n, ref_s, ref_t, temperature, b);
  } else if (divergence == kForwardKL) {
    if (raw) block_sums<false, true, true>(xs, xt, n, ref_s, ref_t, temperature, b);
    else block_sums<false, true, false>(xs, xt, n, ref_s, ref_t, temperature, b);
  } else {
    if (raw) block_sums<false, false, true>(xs, xt, n, ref_s, ref_t, temperature, b);
    else block_sums<false, false, false>(xs, xt, n, ref_s, ref_t, temperature, b);
  }
  // new maxima, the weights e^{old max - new max} and the shifts (old max - new max) of the old
  // state and of the block; an empty side (max -inf) has weight 0 and shift 0
  const bool old_s = state.ms != -INFINITY, old_t = state.mt != -INFINITY;
  const double ms = std::max(state.ms, double(max_s)), mt = std::max(state.mt, double(max_t));
  const double shift_os = old_s ? state.ms - ms : 0.0, shift_bs = block_s ? ref_s - ms : 0.0;
  const double shift_ot = old_t ? state.mt - mt : 0.0, shift_bt = block_t ? ref_t - mt : 0.0;
  const double a_s = old_s ? std::exp(shift_os) : 0.0, b_s = block_s ? std::exp(shift_bs) : 0.0;
  const double a_t = old_t ? std::exp(shift_ot) : 0.0, b_t = block_t ? std::exp(shift_bt) : 0.0;
  RowState& s = state;
  s.cs = scaled(a_s, s.cs + s.zs * shift_os) + scaled(b_s, b[kCs] + b[kZs] * shift_bs);
  s.ds = scaled(a_s, s.ds + s.zs * (shift_os - shift_ot)) + scaled(b_s, b[kDs] + b[kZs] * (shift_bs - shift_bt));
  if (raw) {
    const double a_y = old_s ? std::exp(temperature * shift_os) : 0.0;
    const double b_y = block_s ? std::exp(temperature * shift_bs) : 0.0;
    s.zy = a_y * s.zy + b_y * b[kZy];
  }
  s.zs = a_s * s.zs + b_s * b[kZs];
  s.ct = scaled(a_t, s.ct + s.zt * shift_ot) + scaled(b_t, b[kCt] + b[kZt] * shift_bt);
  s.dt = scaled(a_t, s.dt + s.zt * (shift_ot - shift_os)) + scaled(b_t, b[kDt] + b[kZt] * (shift_bt - shift_bs));
  s.zt = a_t * s.zt + b_t * b[kZt];
  s.ms = ms;
  s.mt = mt;
}

// The stats row (see stats_layout.h) from the finished state; jsd's loss and shift come later
// from jsd_block_terms, which needs both final log Z. A row with a side that is -inf everywhere
// has no distribution: NaN by contract, like a NaN or +inf logit.
inline void finish_row(const RowState& state, Divergence divergence, double temperature, bool need_raw, float* stats_row) {
  if (state.poisoned || state.ms == -INFINITY || state.mt == -INFINITY) {
    for (int c = 0; c < kNumStats; ++c) stats_row[c] = NAN;
    if (!need_raw) stats_row[kStudentRawMax] = stats_row[kStudentRawLogZ] = 0.0f;
    return;
  }
  const double log_zs = std::log(state.zs), log_zt = std::log(state.zt);
  double loss = 0.0, shift = 0.0;
  if (divergence == kReverseKL) {
    loss = state.ds / state.zs - (log_zs - log_zt);
    shift = loss;
  } else if (divergence == kForwardKL) {
    loss = state.dt / state.zt - (log_zt - log_zs);
  }
  stats_row[kLoss] = static_cast<float>(loss);
  stats_row[kStudentMax] = static_cast<float>(state.ms);  // exact: the max of fp32 values
  stats_row[kStudentLogZ] = static_cast<float>(log_zs);
  stats_row[kTeacherMax] = static_cast<float>(state.mt);
  stats_row[kTeacherLogZ] = static_cast<float>(log_zt);
  stats_row[kStudentEntropy] = static_cast<float>(log_zs - state.cs / state.zs);
  stats_row[kTeacherEntropy] = static_cast<float>(log_zt - state.ct / state.zt);
  stats_row[kGradShift] = static_cast<float>(shift);
  stats_row[kGradShiftLo] = static_cast<float>(shift - double(stats_row[kGradShift]));
  // untempered y_s = T x_s: max T m_s, log Z = log sum e^{T (x_s - m_s)}
  stats_row[kStudentRawMax] = need_raw ? static_cast<float>(temperature * state.ms) : 0.0f;
  stats_row[kStudentRawLogZ] = need_raw ? static_cast<float>(temperature == 1.0 ? log_zs : std::log(state.zy)) : 0.0f;
}

// log m with m = beta q + (1 - beta) p, from log p and log q, with one exp and one log
#pragma omp declare simd notinbranch
static inline float jsd_log_mixture(float log_p, float log_q, float beta) {
  const bool teacher_larger = log_q >= log_p;
  const float top = teacher_larger ? log_q : log_p;
  const float gap = teacher_larger ? log_p - log_q : log_q - log_p;  // <= 0
  const float other = fast_exp(gap);
  const float mixed = teacher_larger ? beta + (1.0f - beta) * other : (1.0f - beta) + beta * other;
  return top + fast_log(mixed);
}

// sum_v q (log q - log m) and sum_v p (log p - log m) over one block, added to the doubles;
// log p = (x_s - m_s) - log Z_s (never x_s - lse_s: see stats_layout.h)
inline void jsd_block_terms(const float* xs, const float* xt, int64_t n, float max_s, float log_zs, float max_t,
                            float log_zt, float beta, double& kl_q_m, double& kl_p_m) {
  for (int64_t start = 0; start < n; start += kSumSpan) {
    const int64_t stop = std::min(n, start + kSumSpan);
    float sum_q = 0, sum_p = 0;
#pragma omp simd reduction(+ : sum_q, sum_p)
    for (int64_t v = start; v < stop; ++v) {
      const float log_p = (xs[v] - max_s) - log_zs, log_q = (xt[v] - max_t) - log_zt;
      const float log_m = jsd_log_mixture(log_p, log_q, beta);
      sum_q += weighted(fast_exp(log_q), log_q - log_m);
      sum_p += weighted(fast_exp(log_p), log_p - log_m);
    }
    kl_q_m += sum_q;
    kl_p_m += sum_p;
  }
}

// Per-row constants of the gradient tile, from a stats row (see row_grad in fused_divergence.cpp).
struct RowGrad {
  float max_s, log_zs, max_t, log_zt;
  float shift, shift_lo;  // hi + lo, so that the shift is exact at any size.
                  // reverse_kl: (log Z_s - log Z_t) + KL, so log p - log q - KL = (us - ut) - shift;
                  // jsd: KL(p||m); forward_kl: unused
  float raw_log_z;                // log sum e^{T us}: softmax(y_s) = e^{T us - raw_log_z}
  float loss_coeff, raw_coeff;  // grad_loss[i] and grad_raw_lse[i] (0 when absent)
};

// dL/da for one block, written over the student row: see the protocol docstring. Everything is
// formed from the max-shifted logits us = x_s - m_s, ut = x_t - m_t.
template <int kDivergence, bool kRaw, bool kCap>
inline void gradient_block(float* xs, const float* xt, int64_t n, const RowGrad& row, float beta, float temperature,
                           float scale, float softcap) {
  const float inv_temperature = 1.0f / temperature, coeff = row.loss_coeff * inv_temperature;
  const float cap_scale = kCap ? temperature / softcap : 0.0f;
#pragma omp simd
  for (int64_t v = 0; v < n; ++v) {
    const float us = xs[v] - row.max_s, ut = xt[v] - row.max_t;
    const float p = fast_exp(us - row.log_zs);
    float g;
    if (kDivergence == kReverseKL) {
      g = p * (((us - ut) - row.shift) - row.shift_lo);
    } else if (kDivergence == kForwardKL) {
      g = p - fast_exp(ut - row.log_zt);
    } else {
      const float log_p = us - row.log_zs, log_q = ut - row.log_zt;
      g = (1.0f - beta) * p * ((log_p - jsd_log_mixture(log_p, log_q, beta) - row.shift) - row.shift_lo);
    }
    // 0 * (-inf) would be NaN where the reference has an exact 0 (a -inf logit has p = 0)
    g = p == 0.0f && kDivergence != kForwardKL ? 0.0f : g;
    float dy = coeff * g;
    if (kRaw) dy += row.raw_coeff * fast_exp(temperature * us - row.raw_log_z);
    if (kCap) {
      const float tanh_value = xs[v] * cap_scale;
      dy *= 1.0f - tanh_value * tanh_value;
    }
    xs[v] = dy * scale;
  }
}

inline void gradient_row(float* xs, const float* xt, int64_t n, const RowGrad& row, Divergence divergence, bool raw,
                         float beta, float temperature, float scale, float softcap) {
  const bool cap = softcap > 0.0f;
#define CRISP_GRAD_CASE(DIV)                                                                             \
  if (raw && cap) return gradient_block<DIV, true, true>(xs, xt, n, row, beta, temperature, scale, softcap);   \
  if (raw) return gradient_block<DIV, true, false>(xs, xt, n, row, beta, temperature, scale, softcap);         \
  if (cap) return gradient_block<DIV, false, true>(xs, xt, n, row, beta, temperature, scale, softcap);         \
  return gradient_block<DIV, false, false>(xs, xt, n, row, beta, temperature, scale, softcap);
  if (divergence == kReverseKL) { CRISP_GRAD_CASE(kReverseKL) }
  if (divergence == kForwardKL) { CRISP_GRAD_CASE(kForwardKL) }
  CRISP_GRAD_CASE(kJSD)
#undef CRISP_GRAD_CASE
}

}  // namespace crisp_native
