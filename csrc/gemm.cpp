// Mixed-precision GEMMs (bf16/fp16 operands, fp32 accumulation and output): see gemm.h.
#include "gemm.h"

#include <ATen/cpu/Utils.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <climits>
#include <cstdlib>
#include <cstring>

// MKL's CBLAS mixed-precision GEMMs (LP64 interface, as linked into libtorch_cpu). Declared weak:
// a torch built without MKL (OpenBLAS, aarch64) leaves them null and the fp32 path is used.
extern "C" {
void cblas_gemm_bf16bf16f32(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c,
                            int ldc) __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                          const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c,
                          int ldc) __attribute__((weak));
}

namespace crisp_native {
namespace {

constexpr int kCblasRowMajor = 101, kCblasNoTrans = 111, kCblasTrans = 112;

bool has_symbol(at::ScalarType dtype) {
  return dtype == at::kBFloat16 ? cblas_gemm_bf16bf16f32 != nullptr : cblas_gemm_f16f16f32 != nullptr;
}

bool cpu_flag(const char* name) {
  const auto caps = at::cpu::get_cpu_capabilities();
  const auto found = caps.find(name);
  return found != caps.end() && found->second.isBool() && found->second.toBool();
}

bool cpu_has_units(at::ScalarType dtype) {
  static const bool bf16 = cpu_flag("amx_bf16") || cpu_flag("avx512_bf16");
  static const bool fp16 = cpu_flag("amx_fp16") || cpu_flag("avx512_fp16");
  return dtype == at::kBFloat16 ? bf16 : fp16;
}

const char* forced_path() {
  const char* text = std::getenv("CRISP_FAST_NATIVE_GEMM");
  return text && *text ? text : nullptr;
}

}  // namespace

GemmPath choose_gemm_path(at::ScalarType dtype) {
  if (dtype != at::kBFloat16) return GemmPath::kFloat32;  // fp16: see gemm.h
  if (const char* forced = forced_path()) {
    if (std::strcmp(forced, "fp32") == 0) return GemmPath::kFloat32;
    TORCH_CHECK(std::strcmp(forced, "input") == 0, "CRISP_FAST_NATIVE_GEMM must be 'fp32' or 'input', got '",
                forced, "'");
    TORCH_CHECK(has_symbol(dtype), "CRISP_FAST_NATIVE_GEMM=input: this torch's BLAS has no ",
                dtype == at::kBFloat16 ? "cblas_gemm_bf16bf16f32" : "cblas_gemm_f16f16f32");
    return GemmPath::kInputDtype;
  }
  return has_symbol(dtype) && cpu_has_units(dtype) ? GemmPath::kInputDtype : GemmPath::kFloat32;
}

std::string low_precision_gemm() {
  auto describe = [](at::ScalarType dtype, const char* units) {
    std::string name = dtype == at::kBFloat16 ? "bf16" : "fp16";
    if (choose_gemm_path(dtype) == GemmPath::kInputDtype)
      return name + ": MKL " + (dtype == at::kBFloat16 ? "cblas_gemm_bf16bf16f32" : "cblas_gemm_f16f16f32") +
             " (fp32 accumulators)";
    if (!has_symbol(dtype)) return name + ": fp32 GEMMs on converted blocks (no MKL mixed GEMM in this torch)";
    return name + ": fp32 GEMMs on converted blocks (CPU lacks " + units + ")";
  };
  std::string text = describe(at::kBFloat16, "amx_bf16/avx512_bf16") +
                     "; fp16: fp32 GEMMs on converted blocks (its range cannot hold the gradient tile)";
  if (forced_path()) text += std::string(" [forced by CRISP_FAST_NATIVE_GEMM=") + forced_path() + "]";
  return text;
}

void mixed_gemm(at::ScalarType dtype, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                const void* a, int64_t lda, const void* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  TORCH_CHECK(has_symbol(dtype), "native backend: no mixed-precision GEMM for ", dtype);
  for (int64_t size : {m, n, k, lda, ldb, ldc}) {
    TORCH_CHECK(size <= INT_MAX, "native backend: GEMM dimension ", size, " exceeds the 32-bit BLAS interface");
  }
  if (m == 0 || n == 0) return;
  auto fn = dtype == at::kBFloat16 ? cblas_gemm_bf16bf16f32 : cblas_gemm_f16f16f32;
  fn(kCblasRowMajor, trans_a ? kCblasTrans : kCblasNoTrans, trans_b ? kCblasTrans : kCblasNoTrans, int(m), int(n),
     int(k), alpha, static_cast<const uint16_t*>(a), int(lda), static_cast<const uint16_t*>(b), int(ldb), beta, c,
     int(ldc));
}

void split_floats(at::ScalarType dtype, const float* src, uint16_t* hi, uint16_t* lo, int64_t n) {
  TORCH_CHECK(dtype == at::kBFloat16, "native backend: the gradient tile splits into bf16 only");
  auto* hi16 = reinterpret_cast<c10::BFloat16*>(hi);
  auto* lo16 = reinterpret_cast<c10::BFloat16*>(lo);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const c10::BFloat16 top(src[i]);
    hi16[i] = top;
    lo16[i] = c10::BFloat16(src[i] - static_cast<float>(top));
  }
}

}  // namespace crisp_native
