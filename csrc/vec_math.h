// Element-wise float math that GCC vectorises inside `#pragma omp simd` loops (AVX2: 8 lanes).
//
// std::exp / std::log are scalar library calls, and the fused epilogue evaluates 2-4 of them per
// logit (tens of billions per training step), so the loops need inline, branch-free versions.
// These are the classic Cephes single-precision polynomials (about 1 ulp on the ranges used),
// written with selects instead of branches. Non-finite inputs propagate as the contract asks:
// NaN -> NaN, exp(-inf) = 0, exp(+inf) = +inf.
#pragma once

#include <cstdint>
#include <cstring>

namespace crisp_native {

static inline float bits_to_float(int32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

static inline int32_t float_to_bits(float value) {
  int32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

#pragma omp declare simd notinbranch
static inline float fast_exp(float x) {
  const float hi = 88.3762626647949f, lo = -87.3365447505531f;
  float clamped = x > hi ? hi : (x < lo ? lo : x);
  // exp(x) = 2^k exp(r) with r = x - k ln2 split in two constants for accuracy
  float k = __builtin_floorf(clamped * 1.44269504088896341f + 0.5f);
  float r = clamped - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  float y = poly * r * r + r + 1.0f;
  float result = y * bits_to_float((static_cast<int32_t>(k) + 127) << 23);
  result = x < lo ? 0.0f : result;
  result = x > hi ? __builtin_inff() : result;
  return x != x ? x : result;
}

// Natural log for positive normal floats (the callers only pass values in (0, 1]); NaN propagates.
#pragma omp declare simd notinbranch
static inline float fast_log(float x) {
  int32_t bits = float_to_bits(x);
  float exponent = static_cast<float>(((bits >> 23) & 0xff) - 126);
  float mantissa = bits_to_float((bits & 0x007fffff) | 0x3f000000);  // in [0.5, 1)
  bool small = mantissa < 0.707106781186547524f;
  exponent = small ? exponent - 1.0f : exponent;
  float m = small ? mantissa + mantissa - 1.0f : mantissa - 1.0f;
  float z = m * m;
  float poly = 7.0376836292e-2f;
  poly = poly * m - 1.1514610310e-1f;
  poly = poly * m + 1.1676998740e-1f;
  poly = poly * m - 1.2420140846e-1f;
  poly = poly * m + 1.4249322787e-1f;
  poly = poly * m - 1.6668057665e-1f;
  poly = poly * m + 2.0000714765e-1f;
  poly = poly * m - 2.4999993993e-1f;
  poly = poly * m + 3.3333331174e-1f;
  float y = poly * m * z;
  y = y + exponent * -2.12194440e-4f;
  y = y - 0.5f * z;
  float result = m + y + exponent * 0.693359375f;
  result = x == 0.0f ? -__builtin_inff() : result;
  return x != x ? x : result;
}

// tanh, Cephes' single-precision form (about 2 ulp): an odd polynomial for |u| < 0.625, where
// 1 - 2 / (e^{2u} + 1) would lose digits to cancellation (a softcapped logit near 0 needs the
// relative accuracy: the gradient's 1 - tanh^2 and the logit itself), else through one exp.
#pragma omp declare simd notinbranch
static inline float fast_tanh(float u) {
  const float magnitude = u < 0.0f ? -u : u;
  const float z = u * u;
  float poly = -5.70498872745e-3f;
  poly = poly * z + 2.06390887954e-2f;
  poly = poly * z - 5.37397155531e-2f;
  poly = poly * z + 1.33314422036e-1f;
  poly = poly * z - 3.33332819422e-1f;
  const float small = poly * z * u + u;
  const float large = 1.0f - 2.0f / (fast_exp(2.0f * magnitude) + 1.0f);  // exp(+inf) = inf: 1
  const float signed_large = u < 0.0f ? -large : large;
  const float result = magnitude < 0.625f ? small : signed_large;
  return u != u ? u : result;
}

}  // namespace crisp_native
