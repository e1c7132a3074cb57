// The native CPU backend of crisp-fast's fused linear divergence: public C++ interface.
//
// Same contract as crisp_fast/backends/__init__.py (the Python protocol docstring is the spec):
// rows already compacted and contiguous, biases fp32 or undefined (-inf entries allowed: p = 0
// there), `teacher_weight` undefined when the teacher shares `weight`, statistics fp32
// [N, kNumStats] in the layout of stats_layout.h, gradients fp32.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

#include "stats_layout.h"

namespace crisp_native {

enum Divergence : int64_t { kReverseKL = 0, kForwardKL = 1, kJSD = 2 };

struct Options {
  Divergence divergence = kReverseKL;
  double beta = 1.0;
  double temperature = 1.0;
  double student_scale = 1.0, teacher_scale = 1.0;
  double student_softcap = 0.0, teacher_softcap = 0.0;  // 0 = no softcap
  bool need_raw_lse = false;
  // Bitwise-repeatable results. Always true of this backend (fixed chunking, fixed reduction
  // order, no atomics, GEMMs on fixed shapes): accepted so the protocol is the same everywhere.
  bool deterministic = false;
  // Scratch bytes a call may hold beyond its outputs (-1: kScratchShareOfGradients of the
  // irreducible gradients, so outputs + scratch <= 1.5x them). More scratch, larger row chunks.
  int64_t workspace_bytes = -1;
};

struct Grads {
  at::Tensor hidden, weight, bias;  // fp32, undefined when not asked for
};

// How a call is tiled, and the bytes of scratch memory it holds beyond its outputs.
struct Plan {
  int64_t chunk_rows = 0;     // tokens per chunk
  int64_t vocab_block = 0;    // vocabulary columns per GEMM / epilogue block
  bool full_rows = false;     // the chunk keeps both logits rows for the whole vocabulary
  int64_t workspace_bytes = 0;
};

// full_rows: forward_backward (and forward of jsd), whose gradients need exact row statistics
// before the first gradient tile; otherwise a streaming pass over vocabulary blocks.
// budget_bytes: Options::workspace_bytes (-1: the default share of the gradients).
Plan make_plan(int64_t n, int64_t vocab, int64_t d, int64_t d_t, bool low_precision, bool full_rows,
               int64_t budget_bytes = -1);

// forward_backward's schedule: full-row chunks (4 GEMMs) when the budget holds enough rows for
// efficient GEMMs, else the streaming forward + backward (6 GEMMs on larger chunks).
bool fused_uses_full_rows(int64_t n, int64_t vocab, int64_t d, int64_t d_t, bool low_precision,
                          const Options& options);

at::Tensor forward(const at::Tensor& student_hidden, const at::Tensor& teacher_hidden,
                   const at::Tensor& weight, const at::Tensor& teacher_weight,
                   const at::Tensor& student_bias, const at::Tensor& teacher_bias, const Options& options);

Grads backward(const at::Tensor& student_hidden, const at::Tensor& teacher_hidden,
               const at::Tensor& weight, const at::Tensor& teacher_weight,
               const at::Tensor& student_bias, const at::Tensor& teacher_bias,
               const at::Tensor& stats, const at::Tensor& grad_loss, const at::Tensor& grad_raw_lse,
               bool need_grad_hidden, bool need_grad_weight, bool need_grad_bias, const Options& options);

std::tuple<at::Tensor, Grads> forward_backward(
    const at::Tensor& student_hidden, const at::Tensor& teacher_hidden, const at::Tensor& weight,
    const at::Tensor& teacher_weight, const at::Tensor& student_bias, const at::Tensor& teacher_bias,
    const at::Tensor& grad_loss, const at::Tensor& grad_raw_lse,
    bool need_grad_hidden, bool need_grad_weight, bool need_grad_bias, const Options& options);

}  // namespace crisp_native
