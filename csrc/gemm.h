// GEMMs with bf16 / fp16 operands and fp32 accumulation and output, for the native backend.
//
// Why: ATen's CPU `mm` of two bf16 tensors returns bf16 (rounded logits would break the numerics
// contract) and has no fp32 `out_dtype` on CPU, so the previous code converted every weight block
// to fp32 and ran fp32 GEMMs at a third of the bf16 rate. MKL (linked into libtorch_cpu) exports
// cblas_gemm_bf16bf16f32 / cblas_gemm_f16f16f32: bf16 x bf16 products are exact in fp32 and are
// accumulated in fp32, so the logits equal those of the fp32 GEMM on the upcast inputs up to the
// summation order. On AMX / AVX512-BF16 CPUs these run on the bf16 units; elsewhere MKL emulates
// them (slower than converting once), so the path is chosen per CPU (see choose_gemm_path).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace crisp_native {

enum class GemmPath {
  kFloat32,     // convert low-precision operands to fp32 blocks, fp32 GEMMs (any BLAS)
  kInputDtype,  // bf16/fp16 operands straight into MKL's mixed GEMM, fp32 accumulators out
};

// The path for inputs of `dtype` on this CPU. fp32 inputs always take kFloat32. For bf16 / fp16,
// bf16: kInputDtype when MKL exports the mixed GEMM and the CPU has native units for it (amx_bf16
// or avx512_bf16). fp16 always converts: the gradient tile's tiny entries (p ~ 1e-10) underflow in
// fp16, so the tile cannot be handed to an fp16 GEMM exactly. CRISP_FAST_NATIVE_GEMM=fp32|input
// forces the bf16 path (A/B checks; `input` without the MKL symbol is an error).
GemmPath choose_gemm_path(at::ScalarType dtype);

// One line for build_info(): what bf16 and fp16 inputs run on here, and why.
std::string low_precision_gemm();

// C[m, n] = alpha op(A) op(B) + beta C, row-major, A and B of `dtype` (bf16 or fp16), C fp32.
// op(X) = X^T when trans_x. lda / ldb / ldc are row strides in elements.
void mixed_gemm(at::ScalarType dtype, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                const void* a, int64_t lda, const void* b, int64_t ldb, float beta, float* c, int64_t ldc);

// src = hi + lo to 16 significant bits: hi = bf16(src), lo = bf16(src - hi)
void split_floats(at::ScalarType dtype, const float* src, uint16_t* hi, uint16_t* lo, int64_t n);

}  // namespace crisp_native
