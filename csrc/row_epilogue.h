// Per-row element-wise passes of the fused epilogue, over one block of a logits row.
//
// Each routine reads a student row `xs` and a teacher row `xt` of the same vocabulary block
// (fp32, just produced by the GEMM and still in cache) and is vectorised over the block with
// `#pragma omp simd`; rows are independent, so callers run them in parallel over rows.
// Block partial sums are fp32 (a block is a few thousand entries) and are merged across blocks
// in double, relative to running maxima, like an online softmax.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "fused_divergence.h"
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

// Running statistics of one row over the vocabulary blocks seen so far. Sums are relative to the
// running maxima: zs = sum e^{xs - ms}, cs = sum e^{xs - ms} (xs - ms), ds = sum e^{xs - ms} (xs - xt),
// zt = sum e^{xt - mt}, dt = sum e^{xt - mt} (xt - xs), zy = sum e^{T (xs - ms)} (untempered).
struct RowState {
  double ms = -INFINITY, zs = 0, cs = 0, ds = 0, zy = 0;
  double mt = -INFINITY, zt = 0, dt = 0;
  bool poisoned = false;  // a NaN or +inf logit: every statistic of the row becomes NaN
};

// One block's contribution to a row, then merged into `state`. The fp32 partial sums run over
// sub-blocks of kSumSpan entries (a short fp32 sum per SIMD lane) and are added up in double.
constexpr int64_t kSumSpan = 512;

// The fp32 sums of one block relative to the references ref_s, ref_t: [zs, cs, ds, zy, zt, dt] (see
// RowState), added to `sums` in double. One instantiation per divergence so that the SIMD loop has
// no branches in it.
template <bool kReverse, bool kForward, bool kRaw>
inline void block_sums(const float* xs, const float* xt, int64_t n, float ref_s, float ref_t, float temperature,
                       double* sums) {
  for (int64_t start = 0; start < n; start += kSumSpan) {
    const int64_t stop = std::min(n, start + kSumSpan);
    float zs_f = 0, cs_f = 0, ds_f = 0, zy_f = 0, zt_f = 0, dt_f = 0;
#pragma omp simd reduction(+ : zs_f, cs_f, ds_f, zy_f, zt_f, dt_f)
    for (int64_t v = start; v < stop; ++v) {
      const float us = xs[v] - ref_s, ut = xt[v] - ref_t;
      const float es = fast_exp(us), et = fast_exp(ut);
      zs_f += es;
      cs_f += us == -INFINITY ? 0.0f : es * us;
      zt_f += et;
      if (kReverse) ds_f += es * (xs[v] - xt[v]);
      if (kForward) dt_f += et * (xt[v] - xs[v]);
      if (kRaw) zy_f += fast_exp(temperature * us);
    }
    sums[0] += zs_f, sums[1] += cs_f, sums[2] += ds_f, sums[3] += zy_f, sums[4] += zt_f, sums[5] += dt_f;
  }
}

inline void accumulate_block(const float* xs, const float* xt, int64_t n, Divergence divergence, float temperature,
                             bool need_raw, RowState& state) {
  const float max_s = row_max(xs, n), max_t = row_max(xt, n);
  if (max_s != max_s || max_t != max_t || max_s == INFINITY || max_t == INFINITY) {
    state.poisoned = true;
    return;
  }
  const bool raw = need_raw && temperature != 1.0f;
  // a block whose logits are all -inf (e.g. a -inf bias) adds nothing to that side
  const float ref_s = max_s == -INFINITY ? 0.0f : max_s, ref_t = max_t == -INFINITY ? 0.0f : max_t;
  double sums[6] = {0, 0, 0, 0, 0, 0};
  if (divergence == kReverseKL) {
    if (raw) block_sums<true, false, true>(xs, xt, n, ref_s, ref_t, temperature, sums);
    else block_sums<true, false, false>(xs, xt, n, ref_s, ref_t, temperature, sums);
  } else if (divergence == kForwardKL) {
    if (raw) block_sums<false, true, true>(xs, xt, n, ref_s, ref_t, temperature, sums);
    else block_sums<false, true, false>(xs, xt, n, ref_s, ref_t, temperature, sums);
  } else {
    if (raw) block_sums<false, false, true>(xs, xt, n, ref_s, ref_t, temperature, sums);
    else block_sums<false, false, false>(xs, xt, n, ref_s, ref_t, temperature, sums);
  }
  const double zs = sums[0], cs = sums[1], ds = sums[2], zy = sums[3], zt = sums[4], dt = sums[5];
  if (max_s != -INFINITY) {
    const double block_max = max_s, merged = std::max(state.ms, block_max);
    const double old_scale = state.ms == -INFINITY ? 0.0 : std::exp(state.ms - merged);
    const double new_scale = std::exp(block_max - merged);
    const double old_cs = state.ms == -INFINITY ? 0.0 : state.cs + state.zs * (state.ms - merged);
    state.cs = old_scale * old_cs + new_scale * (cs + zs * (block_max - merged));
    state.zs = old_scale * state.zs + new_scale * zs;
    state.ds = old_scale * state.ds + new_scale * ds;
    if (raw) {
      const double raw_old = state.ms == -INFINITY ? 0.0 : std::exp(temperature * (state.ms - merged));
      state.zy = raw_old * state.zy + std::exp(temperature * (block_max - merged)) * zy;
    }
    state.ms = merged;
  }
  if (max_t != -INFINITY) {
    const double block_max = max_t, merged = std::max(state.mt, block_max);
    const double old_scale = state.mt == -INFINITY ? 0.0 : std::exp(state.mt - merged);
    const double new_scale = std::exp(block_max - merged);
    state.zt = old_scale * state.zt + new_scale * zt;
    state.dt = old_scale * state.dt + new_scale * dt;
    state.mt = merged;
  }
}

// The [LOSS, lse_s, lse_t, H, shift, raw_lse] row from the finished state (jsd's loss and shift
// come later from jsd_row_terms, which needs both final log-sum-exps).
inline void finish_row(const RowState& state, Divergence divergence, double temperature, bool need_raw, float* stats_row) {
  if (state.poisoned) {
    for (int c = 0; c < kNumStats; ++c) stats_row[c] = NAN;
    if (!need_raw) stats_row[kStudentRawLse] = 0.0f;
    return;
  }
  const double log_zs = std::log(state.zs), lse_s = state.ms + log_zs, lse_t = state.mt + std::log(state.zt);
  double loss = 0.0, shift = 0.0;
  if (divergence == kReverseKL) {
    loss = state.ds / state.zs - lse_s + lse_t;
    shift = loss;
  } else if (divergence == kForwardKL) {
    loss = state.dt / state.zt - lse_t + lse_s;
  }
  stats_row[kLoss] = static_cast<float>(loss);
  stats_row[kStudentLse] = static_cast<float>(lse_s);
  stats_row[kTeacherLse] = static_cast<float>(lse_t);
  stats_row[kStudentEntropy] = static_cast<float>(log_zs - state.cs / state.zs);
  stats_row[kGradShift] = static_cast<float>(shift);
  double raw = 0.0;
  if (need_raw) raw = temperature == 1.0 ? lse_s : temperature * state.ms + std::log(state.zy);
  stats_row[kStudentRawLse] = static_cast<float>(raw);
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

// sum_v q (log q - log m) and sum_v p (log p - log m) over one block, added to the doubles
inline void jsd_block_terms(const float* xs, const float* xt, int64_t n, float lse_s, float lse_t, float beta,
                            double& kl_q_m, double& kl_p_m) {
  for (int64_t start = 0; start < n; start += kSumSpan) {
    const int64_t stop = std::min(n, start + kSumSpan);
    float sum_q = 0, sum_p = 0;
#pragma omp simd reduction(+ : sum_q, sum_p)
    for (int64_t v = start; v < stop; ++v) {
      const float log_p = xs[v] - lse_s, log_q = xt[v] - lse_t;
      const float log_m = jsd_log_mixture(log_p, log_q, beta);
      sum_q += fast_exp(log_q) * (log_q - log_m);
      sum_p += fast_exp(log_p) * (log_p - log_m);
    }
    kl_q_m += sum_q;
    kl_p_m += sum_p;
  }
}

// Per-row constants of the gradient tile.
struct RowGrad {
  float lse_s, lse_t, shift, raw_lse;
  float loss_coeff, raw_coeff;  // grad_loss[i] and grad_raw_lse[i] (0 when absent)
};

// dL/da for one block, written over the student row: see the protocol docstring.
template <int kDivergence, bool kRaw, bool kCap>
inline void gradient_block(float* xs, const float* xt, int64_t n, const RowGrad& row, float beta, float temperature,
                           float scale, float softcap) {
  const float inv_temperature = 1.0f / temperature, coeff = row.loss_coeff * inv_temperature;
  const float cap_scale = kCap ? temperature / softcap : 0.0f;
#pragma omp simd
  for (int64_t v = 0; v < n; ++v) {
    const float log_p = xs[v] - row.lse_s, log_q = xt[v] - row.lse_t;
    const float p = fast_exp(log_p);
    float g;
    if (kDivergence == kReverseKL) {
      g = p * (log_p - log_q - row.shift);
    } else if (kDivergence == kForwardKL) {
      g = p - fast_exp(log_q);
    } else {
      g = (1.0f - beta) * p * (log_p - jsd_log_mixture(log_p, log_q, beta) - row.shift);
    }
    // 0 * (-inf) would be NaN where the reference has an exact 0 (a -inf logit has p = 0)
    g = p == 0.0f && kDivergence != kForwardKL ? 0.0f : g;
    float dy = coeff * g;
    if (kRaw) dy += row.raw_coeff * fast_exp(temperature * xs[v] - row.raw_lse);
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
