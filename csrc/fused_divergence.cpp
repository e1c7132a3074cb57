// The native CPU backend: chunked GEMMs through the platform BLAS (ATen -> MKL/OpenBLAS) with the
// whole divergence epilogue fused into one pass over each logits block while it is in cache.
//
// forward_backward (scalar reductions) reaches the 4-GEMM floor: per chunk of tokens it
//   A. computes student and teacher logits for the whole vocabulary, block by block, and folds
//      each block into the rows' online statistics right after its GEMM;
//   B. finishes the exact row statistics (jsd: one more pass over the stored rows);
//   C. turns each block into the gradient tile in place, then dh_chunk += G_b W_b and
//      dW_b += G_b^T h_chunk.
// The chunk keeps 2 x chunk_rows x V fp32 logits, so chunk_rows comes from the memory budget
// (make_plan). forward (stats only, reduction="none") and backward (recompute from saved stats)
// stream over vocabulary blocks and need only 2 x chunk_rows x block scratch.
#include "fused_divergence.h"

#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "row_epilogue.h"

namespace crisp_native {
namespace {

// 2 x 64 rows x 8192 fp32 = 4 MiB: the epilogue reads the block from L2/L3 right after its GEMM.
// Larger blocks mean fewer GEMM calls and fewer parallel-region joins (each join is a scheduler
// round trip when the 2 cores are oversubscribed), smaller ones a hotter cache.
constexpr int64_t kVocabBlock = 8192;
constexpr int64_t kMaxChunkRows = 512;     // past this the dW GEMM's K gains nothing measurable
constexpr int64_t kStreamChunkRows = 256;  // streaming passes: K of dW += G^T h per chunk
// Scratch allowed beyond the irreducible gradients (dW fp32 [V, D] + dh fp32 [N, D]): the contract
// is peak <= 1.5x those gradients, and we keep a fifth of the half in reserve for BLAS packing
// buffers, the stats, the per-row coefficients and allocator slack (0.45 measured 1.53x RSS).
constexpr double kScratchShareOfGradients = 0.4;

int64_t env_chunk_override() {
  const char* text = std::getenv("CRISP_FAST_NATIVE_CHUNK_ROWS");
  return text ? std::max<int64_t>(0, std::atoll(text)) : 0;
}

struct Problem {
  at::Tensor student_hidden, teacher_hidden, weight, teacher_weight, student_bias, teacher_bias;
  int64_t n = 0, vocab = 0, d = 0, d_t = 0;
  bool shared = false, low_precision = false;
  Options options;
};

Problem make_problem(const at::Tensor& hs, const at::Tensor& ht, const at::Tensor& w, const at::Tensor& wt,
                     const at::Tensor& bs, const at::Tensor& bt, const Options& options) {
  TORCH_CHECK(hs.dim() == 2 && ht.dim() == 2 && w.dim() == 2, "native backend: student_hidden, teacher_hidden and weight must be 2-D");
  TORCH_CHECK(hs.device().is_cpu(), "native backend: tensors must be on the CPU, got ", hs.device());
  TORCH_CHECK(hs.scalar_type() == at::kFloat || hs.scalar_type() == at::kBFloat16 || hs.scalar_type() == at::kHalf,
              "native backend: student_hidden must be float32, bfloat16 or float16, got ", hs.scalar_type());
  Problem p;
  p.shared = !wt.defined();
  const at::Tensor& teacher_w = p.shared ? w : wt;
  TORCH_CHECK(hs.scalar_type() == w.scalar_type(), "native backend: student_hidden and weight dtypes differ");
  TORCH_CHECK(ht.scalar_type() == teacher_w.scalar_type(), "native backend: teacher_hidden and teacher weight dtypes differ");
  TORCH_CHECK(hs.size(1) == w.size(1) && ht.size(1) == teacher_w.size(1) && teacher_w.size(0) == w.size(0),
              "native backend: hidden sizes do not match the weights");
  TORCH_CHECK(hs.size(0) == ht.size(0), "native backend: student and teacher row counts differ");
  TORCH_CHECK(options.temperature > 0, "native backend: temperature must be > 0");
  p.student_hidden = hs.contiguous();
  p.teacher_hidden = ht.contiguous();
  p.weight = w.contiguous();
  p.teacher_weight = p.shared ? at::Tensor() : wt.contiguous();
  for (const at::Tensor* bias : {&bs, &bt}) {
    TORCH_CHECK(!bias->defined() || (bias->dim() == 1 && bias->size(0) == w.size(0)), "native backend: a bias must be [V]");
  }
  p.student_bias = bs.defined() ? bs.to(at::kFloat).contiguous() : at::Tensor();
  p.teacher_bias = bt.defined() ? bt.to(at::kFloat).contiguous() : at::Tensor();
  p.n = hs.size(0);
  p.vocab = w.size(0);
  p.d = hs.size(1);
  p.d_t = ht.size(1);
  p.low_precision = hs.scalar_type() != at::kFloat || ht.scalar_type() != at::kFloat;
  p.options = options;
  return p;
}

// Cache-line aligned scratch. `new float[]` of a large size returns mmap'd memory 16 bytes past a
// page boundary, so every logits row the GEMM writes straddles cache lines: measured 25% slower
// GEMMs at N = 2048, D = 1024.
struct FreeDeleter {
  void operator()(float* data) const { std::free(data); }
};
using AlignedFloats = std::unique_ptr<float[], FreeDeleter>;

AlignedFloats aligned_floats(int64_t count) {
  // buffers of 2 MiB or more sit on huge-page boundaries and ask for transparent huge pages: the
  // logits workspace is first touched inside the GEMMs, 4 KiB page faults would be paid there
  constexpr size_t kLine = 64, kHugePage = size_t(2) << 20;
  const size_t wanted = std::max<size_t>(static_cast<size_t>(count) * sizeof(float), kLine);
  const size_t alignment = wanted >= kHugePage ? kHugePage : kLine;
  const size_t bytes = (wanted + alignment - 1) / alignment * alignment;
  void* data = std::aligned_alloc(alignment, bytes);
  TORCH_CHECK(data != nullptr, "native backend: cannot allocate ", bytes, " bytes of scratch");
#ifdef MADV_HUGEPAGE
  if (alignment == kHugePage) madvise(data, bytes, MADV_HUGEPAGE);  // advice only: failure is harmless
#endif
  return AlignedFloats(static_cast<float*>(data));
}

// Scratch memory: plain heap buffers (no tensor allocations; the GEMMs write into views of them).
struct Workspace {
  Plan plan;
  AlignedFloats logits, student_rows, teacher_rows, weight_block, teacher_weight_block;
  int64_t logits_block_stride = 0;  // floats between vocabulary blocks in `logits`

  Workspace(const Problem& p, const Plan& plan_) : plan(plan_) {
    const int64_t rows = plan.chunk_rows, block = plan.vocab_block;
    logits_block_stride = 2 * rows * block;
    const int64_t blocks = plan.full_rows ? (p.vocab + block - 1) / block : 1;
    logits = aligned_floats(blocks * logits_block_stride);
    // the student and teacher rows of a chunk sit back to back so a shared weight needs one GEMM
    student_rows = aligned_floats(rows * (p.shared ? 2 * p.d : p.d));
    if (!p.shared) teacher_rows = aligned_floats(rows * p.d_t);
    if (p.low_precision) {
      weight_block = aligned_floats(block * p.d);
      if (!p.shared) teacher_weight_block = aligned_floats(block * p.d_t);
    }
  }
};

at::Tensor view(float* data, at::IntArrayRef sizes) {
  return at::from_blob(data, sizes, at::TensorOptions().dtype(at::kFloat));
}

struct Chunk {
  int64_t row0, rows;
  at::Tensor student_hidden, teacher_hidden, stacked_hidden;  // fp32 views of the workspace
};

Chunk load_chunk(const Problem& p, Workspace& ws, int64_t row0, int64_t rows) {
  Chunk c{row0, rows, {}, {}, {}};
  if (p.shared) {
    c.stacked_hidden = view(ws.student_rows.get(), {2 * rows, p.d});
    c.stacked_hidden.narrow(0, 0, rows).copy_(p.student_hidden.narrow(0, row0, rows));
    c.stacked_hidden.narrow(0, rows, rows).copy_(p.teacher_hidden.narrow(0, row0, rows));
    c.student_hidden = c.stacked_hidden.narrow(0, 0, rows);
  } else {
    c.student_hidden = view(ws.student_rows.get(), {rows, p.d});
    c.student_hidden.copy_(p.student_hidden.narrow(0, row0, rows));
    c.teacher_hidden = view(ws.teacher_rows.get(), {rows, p.d_t});
    c.teacher_hidden.copy_(p.teacher_hidden.narrow(0, row0, rows));
  }
  return c;
}

// fp32 view of weight rows [v0, v0 + count): the tensor itself for fp32, else a converted copy
at::Tensor weight_block(const at::Tensor& weight, float* scratch, int64_t v0, int64_t count) {
  at::Tensor rows = weight.narrow(0, v0, count);
  if (weight.scalar_type() == at::kFloat) return rows;
  at::Tensor out = view(scratch, {count, weight.size(1)});
  out.copy_(rows);
  return out;
}

// Raw logits of one block: rows [0, rows) student, [rows, 2 rows) teacher. Returns W_b in fp32.
at::Tensor block_logits(const Problem& p, Workspace& ws, const Chunk& c, int64_t v0, int64_t count, float* out) {
  at::Tensor w_block = weight_block(p.weight, ws.weight_block.get(), v0, count);
  if (p.shared) {
    at::Tensor logits = view(out, {2 * c.rows, count});
    at::mm_out(logits, c.stacked_hidden, w_block.t());
  } else {
    at::Tensor student_logits = view(out, {c.rows, count});
    at::mm_out(student_logits, c.student_hidden, w_block.t());
    at::Tensor wt_block = weight_block(p.teacher_weight, ws.teacher_weight_block.get(), v0, count);
    at::Tensor teacher_logits = view(out + c.rows * count, {c.rows, count});
    at::mm_out(teacher_logits, c.teacher_hidden, wt_block.t());
  }
  return w_block;
}

void transform_rows(const Problem& p, float* block, int64_t rows, int64_t v0, int64_t count, int64_t row) {
  const Options& o = p.options;
  const float inv_t = static_cast<float>(1.0 / o.temperature);
  transform_row(block + row * count, p.student_bias.defined() ? p.student_bias.data_ptr<float>() + v0 : nullptr,
                count, static_cast<float>(o.student_scale), static_cast<float>(o.student_softcap), inv_t);
  transform_row(block + (rows + row) * count, p.teacher_bias.defined() ? p.teacher_bias.data_ptr<float>() + v0 : nullptr,
                count, static_cast<float>(o.teacher_scale), static_cast<float>(o.teacher_softcap), inv_t);
}

// G_b (student half of `block`) into dh, dW and db
void apply_gradient_block(const Problem& p, const Chunk& c, const at::Tensor& w_block, float* block, int64_t v0,
                          int64_t count, bool first_chunk, Grads& grads) {
  at::Tensor g = view(block, {c.rows, count});
  if (grads.hidden.defined()) grads.hidden.narrow(0, c.row0, c.rows).addmm_(g, w_block);
  if (grads.weight.defined()) {
    at::Tensor dw = grads.weight.narrow(0, v0, count);
    // the first chunk writes dW instead of accumulating, saving a zero fill and a read of dW
    if (first_chunk) at::mm_out(dw, g.t(), c.student_hidden);
    else dw.addmm_(g.t(), c.student_hidden);
  }
  if (grads.bias.defined()) {
    float* db = grads.bias.data_ptr<float>() + v0;
    at::parallel_for(0, count, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = 0; r < c.rows; ++r) {
        const float* g_row = block + r * count;
#pragma omp simd
        for (int64_t v = begin; v < end; ++v) db[v] += g_row[v];
      }
    });
  }
}

Grads make_grads(const Problem& p, bool need_hidden, bool need_weight, bool need_bias) {
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  Grads grads;
  if (need_hidden) grads.hidden = at::zeros({p.n, p.d}, f32);
  if (need_weight) grads.weight = at::empty({p.vocab, p.d}, f32);  // written by the first chunk
  if (need_bias) grads.bias = at::zeros({p.vocab}, f32);
  return grads;
}

RowGrad row_grad(const float* stats_row, const float* grad_loss, const float* grad_raw_lse, int64_t i) {
  return RowGrad{stats_row[kStudentLse], stats_row[kTeacherLse], stats_row[kGradShift], stats_row[kStudentRawLse],
                 grad_loss[i], grad_raw_lse ? grad_raw_lse[i] : 0.0f};
}

// Phases A and B over one chunk: stats rows [row0, row0 + rows). With full rows the logits stay
// in the workspace for phase C.
void chunk_statistics(const Problem& p, Workspace& ws, const Chunk& c, float* stats) {
  const Options& o = p.options;
  const int64_t block = ws.plan.vocab_block;
  const float temperature = static_cast<float>(o.temperature);
  std::vector<RowState> states(c.rows);
  for (int64_t v0 = 0, b = 0; v0 < p.vocab; v0 += block, ++b) {
    const int64_t count = std::min(block, p.vocab - v0);
    float* out = ws.logits.get() + (ws.plan.full_rows ? b * ws.logits_block_stride : 0);
    block_logits(p, ws, c, v0, count, out);
    at::parallel_for(0, c.rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        transform_rows(p, out, c.rows, v0, count, r);
        accumulate_block(out + r * count, out + (c.rows + r) * count, count, o.divergence, temperature,
                         o.need_raw_lse, states[r]);
      }
    });
  }
  at::parallel_for(0, c.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* stats_row = stats + (c.row0 + r) * kNumStats;
      finish_row(states[r], o.divergence, o.temperature, o.need_raw_lse, stats_row);
      if (o.divergence != kJSD || states[r].poisoned) continue;
      TORCH_INTERNAL_ASSERT(ws.plan.full_rows, "jsd statistics need the full rows");
      double kl_q_m = 0, kl_p_m = 0;
      for (int64_t v0 = 0, b = 0; v0 < p.vocab; v0 += block, ++b) {
        const int64_t count = std::min(block, p.vocab - v0);
        const float* out = ws.logits.get() + b * ws.logits_block_stride;
        jsd_block_terms(out + r * count, out + (c.rows + r) * count, count, stats_row[kStudentLse],
                        stats_row[kTeacherLse], static_cast<float>(o.beta), kl_q_m, kl_p_m);
      }
      stats_row[kLoss] = static_cast<float>(o.beta * kl_q_m + (1.0 - o.beta) * kl_p_m);
      stats_row[kGradShift] = static_cast<float>(kl_p_m);
    }
  });
}

float* optional_data(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

at::Tensor as_rows(const at::Tensor& t, int64_t n, const char* name) {
  if (!t.defined()) return t;
  TORCH_CHECK(t.numel() == n, "native backend: ", name, " must have ", n, " elements, got ", t.numel());
  return t.to(at::kFloat).contiguous();
}

}  // namespace

Plan make_plan(int64_t n, int64_t vocab, int64_t d, int64_t d_t, bool low_precision, bool full_rows) {
  Plan plan;
  plan.full_rows = full_rows;
  plan.vocab_block = std::min<int64_t>(kVocabBlock, std::max<int64_t>(vocab, 1));
  int64_t rows;
  const int64_t forced = env_chunk_override();
  if (forced > 0) {
    rows = forced;
  } else if (full_rows) {
    const double gradient_bytes = 4.0 * (double(vocab) * d + double(n) * d);
    const double fixed = low_precision ? 4.0 * plan.vocab_block * (d + d_t) : 0.0;
    const double per_row = 2.0 * 4.0 * vocab + 4.0 * (d + d_t);
    rows = static_cast<int64_t>((kScratchShareOfGradients * gradient_bytes - fixed) / per_row);
    rows = std::min(rows, kMaxChunkRows);
  } else {
    // streaming keeps one block of both sides; small hidden sizes (tiny gradients) get fewer rows
    const double gradient_bytes = 4.0 * (double(vocab) * d + double(n) * d);
    const double fixed = low_precision ? 4.0 * plan.vocab_block * (d + d_t) : 0.0;
    const double per_row = 2.0 * 4.0 * plan.vocab_block + 4.0 * (d + d_t);
    rows = static_cast<int64_t>((kScratchShareOfGradients * gradient_bytes - fixed) / per_row);
    rows = std::min(rows, kStreamChunkRows);
  }
  rows = std::max<int64_t>(1, std::min(rows, n));
  // equal chunks: no ragged 3-row tail chunk with a poor GEMM
  const int64_t chunks = (n + rows - 1) / rows;
  rows = (n + chunks - 1) / chunks;
  plan.chunk_rows = rows;
  const int64_t blocks = full_rows ? (vocab + plan.vocab_block - 1) / plan.vocab_block : 1;
  plan.workspace_bytes = 4 * (blocks * 2 * rows * plan.vocab_block + rows * (d + d_t) +
                              (low_precision ? plan.vocab_block * (d + d_t) : 0));
  return plan;
}

at::Tensor forward(const at::Tensor& hs, const at::Tensor& ht, const at::Tensor& w, const at::Tensor& wt,
                   const at::Tensor& bs, const at::Tensor& bt, const Options& options) {
  c10::NoGradGuard no_grad;  // the out= GEMMs refuse inputs that require grad; we are the gradient
  Problem p = make_problem(hs, ht, w, wt, bs, bt, options);
  at::Tensor stats = at::zeros({p.n, kNumStats}, at::TensorOptions().dtype(at::kFloat));
  Workspace ws(p, make_plan(p.n, p.vocab, p.d, p.d_t, p.low_precision, options.divergence == kJSD));
  for (int64_t row0 = 0; row0 < p.n; row0 += ws.plan.chunk_rows) {
    const int64_t rows = std::min(ws.plan.chunk_rows, p.n - row0);
    chunk_statistics(p, ws, load_chunk(p, ws, row0, rows), stats.data_ptr<float>());
  }
  return stats;
}

std::tuple<at::Tensor, Grads> forward_backward(const at::Tensor& hs, const at::Tensor& ht, const at::Tensor& w,
                                               const at::Tensor& wt, const at::Tensor& bs, const at::Tensor& bt,
                                               const at::Tensor& grad_loss_in, const at::Tensor& grad_raw_in,
                                               bool need_hidden, bool need_weight, bool need_bias,
                                               const Options& options) {
  c10::NoGradGuard no_grad;  // the out= GEMMs refuse inputs that require grad; we are the gradient
  Problem p = make_problem(hs, ht, w, wt, bs, bt, options);
  at::Tensor grad_loss = as_rows(grad_loss_in, p.n, "grad_loss");
  TORCH_CHECK(grad_loss.defined(), "native backend: grad_loss is required");
  at::Tensor grad_raw = as_rows(grad_raw_in, p.n, "grad_raw_lse");
  TORCH_CHECK(!grad_raw.defined() || options.need_raw_lse, "native backend: grad_raw_lse needs need_raw_lse=True");
  at::Tensor stats = at::zeros({p.n, kNumStats}, at::TensorOptions().dtype(at::kFloat));
  Grads grads = make_grads(p, need_hidden, need_weight, need_bias);
  Workspace ws(p, make_plan(p.n, p.vocab, p.d, p.d_t, p.low_precision, true));
  const Options& o = options;
  const int64_t block = ws.plan.vocab_block;
  for (int64_t row0 = 0; row0 < p.n; row0 += ws.plan.chunk_rows) {
    const int64_t rows = std::min(ws.plan.chunk_rows, p.n - row0);
    Chunk c = load_chunk(p, ws, row0, rows);
    chunk_statistics(p, ws, c, stats.data_ptr<float>());
    for (int64_t v0 = 0, b = 0; v0 < p.vocab; v0 += block, ++b) {
      const int64_t count = std::min(block, p.vocab - v0);
      float* out = ws.logits.get() + b * ws.logits_block_stride;
      at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const RowGrad rg = row_grad(stats.data_ptr<float>() + (row0 + r) * kNumStats, grad_loss.data_ptr<float>(),
                                      optional_data(grad_raw), row0 + r);
          gradient_row(out + r * count, out + (rows + r) * count, count, rg, o.divergence, grad_raw.defined(),
                       static_cast<float>(o.beta), static_cast<float>(o.temperature),
                       static_cast<float>(o.student_scale), static_cast<float>(o.student_softcap));
        }
      });
      at::Tensor w_block = weight_block(p.weight, ws.weight_block.get(), v0, count);
      apply_gradient_block(p, c, w_block, out, v0, count, row0 == 0, grads);
    }
  }
  return {stats, grads};
}

Grads backward(const at::Tensor& hs, const at::Tensor& ht, const at::Tensor& w, const at::Tensor& wt,
               const at::Tensor& bs, const at::Tensor& bt, const at::Tensor& stats_in, const at::Tensor& grad_loss_in,
               const at::Tensor& grad_raw_in, bool need_hidden, bool need_weight, bool need_bias,
               const Options& options) {
  c10::NoGradGuard no_grad;  // the out= GEMMs refuse inputs that require grad; we are the gradient
  Problem p = make_problem(hs, ht, w, wt, bs, bt, options);
  TORCH_CHECK(stats_in.dim() == 2 && stats_in.size(0) == p.n && stats_in.size(1) == kNumStats,
              "native backend: stats must be [", p.n, ", ", int64_t(kNumStats), "]");
  at::Tensor stats = stats_in.to(at::kFloat).contiguous();
  at::Tensor grad_loss = as_rows(grad_loss_in, p.n, "grad_loss");
  TORCH_CHECK(grad_loss.defined(), "native backend: grad_loss is required");
  at::Tensor grad_raw = as_rows(grad_raw_in, p.n, "grad_raw_lse");
  TORCH_CHECK(!grad_raw.defined() || options.need_raw_lse, "native backend: grad_raw_lse needs need_raw_lse=True");
  Grads grads = make_grads(p, need_hidden, need_weight, need_bias);
  if (!need_hidden && !need_weight && !need_bias) return grads;
  Workspace ws(p, make_plan(p.n, p.vocab, p.d, p.d_t, p.low_precision, false));
  const Options& o = options;
  const int64_t block = ws.plan.vocab_block;
  for (int64_t row0 = 0; row0 < p.n; row0 += ws.plan.chunk_rows) {
    const int64_t rows = std::min(ws.plan.chunk_rows, p.n - row0);
    Chunk c = load_chunk(p, ws, row0, rows);
    for (int64_t v0 = 0; v0 < p.vocab; v0 += block) {
      const int64_t count = std::min(block, p.vocab - v0);
      float* out = ws.logits.get();
      at::Tensor w_block = block_logits(p, ws, c, v0, count, out);
      at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          transform_rows(p, out, rows, v0, count, r);
          const RowGrad rg = row_grad(stats.data_ptr<float>() + (row0 + r) * kNumStats, grad_loss.data_ptr<float>(),
                                      optional_data(grad_raw), row0 + r);
          gradient_row(out + r * count, out + (rows + r) * count, count, rg, o.divergence, grad_raw.defined(),
                       static_cast<float>(o.beta), static_cast<float>(o.temperature),
                       static_cast<float>(o.student_scale), static_cast<float>(o.student_softcap));
        }
      });
      apply_gradient_block(p, c, w_block, out, v0, count, row0 == 0, grads);
    }
  }
  return grads;
}

}  // namespace crisp_native
