// The native CPU backend: chunked GEMMs through the platform BLAS (ATen -> MKL/OpenBLAS) with the
// whole divergence epilogue fused into one pass over each logits block while it is in cache.
//
// forward_backward (scalar reductions) reaches the 4-GEMM floor when the memory budget holds
// enough full rows (fused_uses_full_rows; else it streams, below): per chunk of tokens it
//   A. computes student and teacher logits for the whole vocabulary, block by block, and folds
//      each block into the rows' online statistics right after its GEMM;
//   B. finishes the exact row statistics (jsd: one more pass over the stored rows);
//   C. turns each block into the gradient tile in place, then dh_chunk += G_b W_b and
//      dW_b += G_b^T h_chunk.
// The chunk keeps 2 x chunk_rows x V fp32 logits, so chunk_rows comes from the memory budget
// (make_plan). forward (stats only, reduction="none") and backward (recompute from saved stats)
// stream over vocabulary blocks and need only 2 x chunk_rows x block scratch.
// The GEMMs' speed is set by chunk_rows (their M, or K for dW), and at D = 256, V = 151,936
// the default budget holds ~50 full rows: 59 GFLOP/s against 100 for the streaming GEMMs on
// 1,024-row chunks (AVX2, N = 8192), so there 6 streaming GEMMs beat 4 full-row ones (38 s
// against 43 s); kMinFullRows is where the two meet (full rows measured 74 GFLOP/s at 256).
#include "fused_divergence.h"

#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "gemm.h"
#include "row_epilogue.h"

namespace crisp_native {
namespace {

// 2 x 64 rows x 8192 fp32 = 4 MiB: the epilogue reads the block from L2/L3 right after its GEMM.
// Larger blocks mean fewer GEMM calls and fewer parallel-region joins (each join is a scheduler
// round trip when the 2 cores are oversubscribed), smaller ones a hotter cache.
constexpr int64_t kVocabBlock = 8192;
constexpr int64_t kMaxChunkRows = 512;     // past this the dW GEMM's K gains nothing measurable
constexpr int64_t kStreamChunkRows = 1024;  // streaming passes: M of the logits GEMMs, K of dW += G^T h
constexpr int64_t kMinFullRows = 192;       // fewer full rows than this: forward_backward streams
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
  // the dtype each side's GEMMs read: the input dtype on the mixed path (gemm.h), else fp32
  at::ScalarType student_gemm_dtype = at::kFloat, teacher_gemm_dtype = at::kFloat;
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
  auto gemm_dtype = [](at::ScalarType dtype) {
    return choose_gemm_path(dtype) == GemmPath::kInputDtype ? dtype : at::kFloat;
  };
  p.student_gemm_dtype = gemm_dtype(hs.scalar_type());
  p.teacher_gemm_dtype = p.shared ? p.student_gemm_dtype : gemm_dtype(ht.scalar_type());
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

// Rows of a chunk handed out one at a time from a shared counter instead of a static split: when
// another process takes one of the cores, the thread there gets fewer rows and the join does not
// wait for it (issue 16: a static split ran at the slow core's pace, 4.6x the floor). A row's
// result does not depend on which thread computes it, so this stays bitwise deterministic.
template <typename RowFn>
void for_each_row(int64_t rows, const RowFn& fn) {
  const int64_t workers = std::min<int64_t>(rows, at::get_num_threads());
  if (workers <= 1 || at::in_parallel_region()) {
    for (int64_t r = 0; r < rows; ++r) fn(r);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t r = next.fetch_add(1, std::memory_order_relaxed); r < rows;
         r = next.fetch_add(1, std::memory_order_relaxed)) {
      fn(r);
    }
  });
}

int64_t element_size(at::ScalarType dtype) { return dtype == at::kFloat ? 4 : 2; }

// Scratch memory: plain heap buffers (no tensor allocations; the GEMMs write into views of them).
struct Workspace {
  Plan plan;
  AlignedFloats logits, student_rows, teacher_rows, weight_block, teacher_weight_block, grad_tile;
  int64_t logits_block_stride = 0;  // floats between vocabulary blocks in `logits`

  static AlignedFloats bytes(int64_t count) { return aligned_floats((count + 3) / 4); }

  Workspace(const Problem& p, const Plan& plan_) : plan(plan_) {
    const int64_t rows = plan.chunk_rows, block = plan.vocab_block;
    logits_block_stride = 2 * rows * block;
    const int64_t blocks = plan.full_rows ? (p.vocab + block - 1) / block : 1;
    logits = aligned_floats(blocks * logits_block_stride);
    // the student and teacher rows of a chunk sit back to back so a shared weight needs one GEMM;
    // they are kept in the dtype the GEMMs read (the input dtype on the mixed path, else fp32)
    student_rows = bytes(rows * (p.shared ? 2 * p.d : p.d) * element_size(p.student_gemm_dtype));
    if (!p.shared) teacher_rows = bytes(rows * p.d_t * element_size(p.teacher_gemm_dtype));
    if (p.student_gemm_dtype != p.student_hidden.scalar_type()) weight_block = aligned_floats(block * p.d);
    if (!p.shared && p.teacher_gemm_dtype != p.teacher_hidden.scalar_type())
      teacher_weight_block = aligned_floats(block * p.d_t);
    // the gradient tile split into two bf16 tiles (hi, lo) for the mixed dh / dW GEMMs
    // (forward_backward rounds each tile into its block's spent teacher half instead)
    if (p.student_gemm_dtype != at::kFloat && !plan.full_rows) grad_tile = bytes(2 * rows * block * 2);
  }
};

at::Tensor view(void* data, at::IntArrayRef sizes, at::ScalarType dtype = at::kFloat) {
  return at::from_blob(data, sizes, at::TensorOptions().dtype(dtype));
}

struct Chunk {
  int64_t row0, rows;
  // views of the workspace in the GEMM dtype of each side
  at::Tensor student_hidden, teacher_hidden, stacked_hidden;
};

Chunk load_chunk(const Problem& p, Workspace& ws, int64_t row0, int64_t rows) {
  Chunk c{row0, rows, {}, {}, {}};
  if (p.shared) {
    c.stacked_hidden = view(ws.student_rows.get(), {2 * rows, p.d}, p.student_gemm_dtype);
    c.stacked_hidden.narrow(0, 0, rows).copy_(p.student_hidden.narrow(0, row0, rows));
    c.stacked_hidden.narrow(0, rows, rows).copy_(p.teacher_hidden.narrow(0, row0, rows));
    c.student_hidden = c.stacked_hidden.narrow(0, 0, rows);
  } else {
    c.student_hidden = view(ws.student_rows.get(), {rows, p.d}, p.student_gemm_dtype);
    c.student_hidden.copy_(p.student_hidden.narrow(0, row0, rows));
    c.teacher_hidden = view(ws.teacher_rows.get(), {rows, p.d_t}, p.teacher_gemm_dtype);
    c.teacher_hidden.copy_(p.teacher_hidden.narrow(0, row0, rows));
  }
  return c;
}

// Weight rows [v0, v0 + count) in the GEMM dtype: the tensor itself, or a converted fp32 copy
at::Tensor weight_block(const at::Tensor& weight, at::ScalarType gemm_dtype, float* scratch, int64_t v0,
                        int64_t count) {
  at::Tensor rows = weight.narrow(0, v0, count);
  if (weight.scalar_type() == gemm_dtype) return rows;
  at::Tensor out = view(scratch, {count, weight.size(1)});
  out.copy_(rows);
  return out;
}

// out[m, count] = hidden[m, k] W_b^T, fp32 out: ATen's mm for fp32, MKL's mixed GEMM otherwise
void logits_gemm(const at::Tensor& hidden, const at::Tensor& w_block, float* out) {
  const int64_t m = hidden.size(0), k = hidden.size(1), count = w_block.size(0);
  if (hidden.scalar_type() == at::kFloat) {
    at::Tensor logits = view(out, {m, count});
    at::mm_out(logits, hidden, w_block.t());
  } else {
    mixed_gemm(hidden.scalar_type(), false, true, m, count, k, 1.0f, hidden.data_ptr(), k, w_block.data_ptr(), k,
               0.0f, out, count);
  }
}

// Raw logits of one block: rows [0, rows) student, [rows, 2 rows) teacher. Returns the student
// side's W_b in its GEMM dtype.
at::Tensor block_logits(const Problem& p, Workspace& ws, const Chunk& c, int64_t v0, int64_t count, float* out) {
  at::Tensor w_block = weight_block(p.weight, p.student_gemm_dtype, ws.weight_block.get(), v0, count);
  if (p.shared) {
    logits_gemm(c.stacked_hidden, w_block, out);
  } else {
    logits_gemm(c.student_hidden, w_block, out);
    at::Tensor wt_block =
        weight_block(p.teacher_weight, p.teacher_gemm_dtype, ws.teacher_weight_block.get(), v0, count);
    logits_gemm(c.teacher_hidden, wt_block, out + c.rows * count);
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

// After gradient_row: on the mixed path, row r of G_b split into bf16 hi + lo tiles for the GEMMs
void round_gradient_row(const Problem& p, Workspace& ws, const float* g_row, int64_t r, int64_t count) {
  if (p.student_gemm_dtype == at::kFloat) return;
  uint16_t* tiles = reinterpret_cast<uint16_t*>(ws.grad_tile.get());
  split_floats(p.student_gemm_dtype, g_row, tiles + r * count, tiles + (ws.plan.chunk_rows + r) * count, count);
}

// G_b (student half of `block`) into dh, dW and db
// `split`: the mixed path's hi tile, followed by the lo tile `lo_offset` elements later (default
// ws.grad_tile, lo after chunk_rows rows).
void apply_gradient_block(const Problem& p, Workspace& ws, const Chunk& c, const at::Tensor& w_block, float* block,
                          int64_t v0, int64_t count, bool first_chunk, Grads& grads, const void* split = nullptr) {
  if (p.student_gemm_dtype != at::kFloat) {
    // G_b = hi + lo, both bf16, fp32 accumulators. dh sums over the vocabulary with cancellation
    // (sum_v g = 0 for reverse KL) that W's mean column amplifies: hi alone (a bf16-rounded G)
    // was 40x the plain error at logits ~1e4, hi + lo (16 bits) is within it. dW with hi alone
    // measured 1.93x the plain bf16 error (too close to the 2x contract), so it takes both too:
    // 6 bf16 GEMMs in all, 1.5x the 4-GEMM count, still ~2x fewer cycles than fp32 on AMX.
    const at::ScalarType dtype = p.student_gemm_dtype;
    const uint16_t* hi = static_cast<const uint16_t*>(split ? split : ws.grad_tile.get());
    const uint16_t* lo = split ? hi + c.rows * count : hi + ws.plan.chunk_rows * count;
    if (grads.hidden.defined()) {
      for (const uint16_t* g : {hi, lo})
        mixed_gemm(dtype, false, false, c.rows, p.d, count, 1.0f, g, count, w_block.data_ptr(), p.d, 1.0f,
                   grads.hidden.data_ptr<float>() + c.row0 * p.d, p.d);
    }
    if (grads.weight.defined()) {
      float beta = first_chunk ? 0.0f : 1.0f;
      for (const uint16_t* g : {hi, lo}) {
        mixed_gemm(dtype, true, false, count, p.d, c.rows, 1.0f, g, count, c.student_hidden.data_ptr(), p.d, beta,
                   grads.weight.data_ptr<float>() + v0 * p.d, p.d);
        beta = 1.0f;
      }
    }
  } else {
    at::Tensor g = view(block, {c.rows, count});
    if (grads.hidden.defined()) grads.hidden.narrow(0, c.row0, c.rows).addmm_(g, w_block);
    if (grads.weight.defined()) {
      at::Tensor dw = grads.weight.narrow(0, v0, count);
      // the first chunk writes dW instead of accumulating, saving a zero fill and a read of dW
      if (first_chunk) at::mm_out(dw, g.t(), c.student_hidden);
      else dw.addmm_(g.t(), c.student_hidden);
    }
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

RowGrad row_grad(const float* stats_row, Divergence divergence, const float* grad_loss, const float* grad_raw_lse,
                 int64_t i) {
  RowGrad g;
  g.max_s = stats_row[kStudentMax];
  g.log_zs = stats_row[kStudentLogZ];
  g.max_t = stats_row[kTeacherMax];
  g.log_zt = stats_row[kTeacherLogZ];
  // reverse KL: log p - log q - KL = (us - ut) - [(log Z_s - log Z_t) + KL], the bracket in double
  const double shift = double(stats_row[kGradShift]) + double(stats_row[kGradShiftLo]) +
                       (divergence == kReverseKL ? double(g.log_zs) - double(g.log_zt) : 0.0);
  g.shift = static_cast<float>(shift);
  g.shift_lo = static_cast<float>(shift - double(g.shift));
  g.raw_log_z = stats_row[kStudentRawLogZ];
  g.loss_coeff = grad_loss[i];
  g.raw_coeff = grad_raw_lse ? grad_raw_lse[i] : 0.0f;
  return g;
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
    for_each_row(c.rows, [&](int64_t r) {
      transform_rows(p, out, c.rows, v0, count, r);
      accumulate_block(out + r * count, out + (c.rows + r) * count, count, o.divergence, temperature,
                       o.need_raw_lse, states[r]);
    });
  }
  for_each_row(c.rows, [&](int64_t r) {
    float* stats_row = stats + (c.row0 + r) * kNumStats;
    finish_row(states[r], o.divergence, o.temperature, o.need_raw_lse, stats_row);
    if (o.divergence != kJSD || stats_row[kLoss] != stats_row[kLoss]) return;  // NaN rows stay NaN
    TORCH_INTERNAL_ASSERT(ws.plan.full_rows, "jsd statistics need the full rows");
    double kl_q_m = 0, kl_p_m = 0;
    for (int64_t v0 = 0, b = 0; v0 < p.vocab; v0 += block, ++b) {
      const int64_t count = std::min(block, p.vocab - v0);
      const float* out = ws.logits.get() + b * ws.logits_block_stride;
      jsd_block_terms(out + r * count, out + (c.rows + r) * count, count, stats_row[kStudentMax],
                      stats_row[kStudentLogZ], stats_row[kTeacherMax], stats_row[kTeacherLogZ],
                      static_cast<float>(o.beta), kl_q_m, kl_p_m);
    }
    stats_row[kLoss] = static_cast<float>(o.beta * kl_q_m + (1.0 - o.beta) * kl_p_m);
    stats_row[kGradShift] = static_cast<float>(kl_p_m);
    stats_row[kGradShiftLo] = static_cast<float>(kl_p_m - double(stats_row[kGradShift]));
  });
}

// Phase C's element-wise part for row r of one block: the gradient tile over the student logits
// (already transformed), then its rounded copy on the mixed path.
void gradient_tile_row(const Problem& p, Workspace& ws, float* out, int64_t rows, int64_t count, int64_t r,
                       const float* stats_row, float loss_coeff, const float* grad_raw_row, bool round = true) {
  const Options& o = p.options;
  const RowGrad rg = row_grad(stats_row, o.divergence, &loss_coeff, grad_raw_row, 0);
  gradient_row(out + r * count, out + (rows + r) * count, count, rg, o.divergence, grad_raw_row != nullptr,
               static_cast<float>(o.beta), static_cast<float>(o.temperature), static_cast<float>(o.student_scale),
               static_cast<float>(o.student_softcap));
  if (round) round_gradient_row(p, ws, out + r * count, r, count);
}

// &grad_raw_lse[i], or null when there is no raw-lse gradient
const float* raw_row(const at::Tensor& grad_raw, int64_t i) {
  return grad_raw.defined() ? grad_raw.data_ptr<float>() + i : nullptr;
}

at::Tensor as_rows(const at::Tensor& t, int64_t n, const char* name) {
  if (!t.defined()) return t;
  TORCH_CHECK(t.numel() == n, "native backend: ", name, " must have ", n, " elements, got ", t.numel());
  return t.to(at::kFloat).contiguous();
}

}  // namespace

Plan make_plan(int64_t n, int64_t vocab, int64_t d, int64_t d_t, bool low_precision, bool full_rows,
               int64_t budget_bytes) {
  Plan plan;
  const double gradient_bytes = 4.0 * (double(vocab) * d + double(n) * d);
  const double budget = budget_bytes >= 0 ? double(budget_bytes) : kScratchShareOfGradients * gradient_bytes;
  plan.full_rows = full_rows;
  plan.vocab_block = std::min<int64_t>(kVocabBlock, std::max<int64_t>(vocab, 1));
  int64_t rows;
  const int64_t forced = env_chunk_override();
  if (forced > 0) {
    rows = forced;
  } else if (full_rows) {
    const double fixed = low_precision ? 4.0 * plan.vocab_block * (d + d_t) : 0.0;
    // fp32 logits of both sides (whole blocks: the last one is padded) and the hidden rows (the
    // bf16 hi/lo tiles reuse the teacher half)
    const double padded_vocab = double((vocab + plan.vocab_block - 1) / plan.vocab_block * plan.vocab_block);
    const double per_row = 2.0 * 4.0 * padded_vocab + 4.0 * (d + d_t);
    rows = static_cast<int64_t>((budget - fixed) / per_row);
    rows = std::min(rows, kMaxChunkRows);
  } else {
    // streaming keeps one block of both sides; small hidden sizes (tiny gradients) get fewer rows
    const double fixed = low_precision ? 4.0 * plan.vocab_block * (d + d_t) : 0.0;
    const double per_row = 2.0 * 4.0 * plan.vocab_block + 4.0 * (d + d_t) + (low_precision ? 4.0 * plan.vocab_block : 0.0);
    rows = static_cast<int64_t>((budget - fixed) / per_row);
    rows = std::min(rows, kStreamChunkRows);
  }
  rows = std::max<int64_t>(1, std::min(rows, n));
  // equal chunks: no ragged 3-row tail chunk with a poor GEMM
  const int64_t chunks = (n + rows - 1) / rows;
  rows = (n + chunks - 1) / chunks;
  plan.chunk_rows = rows;
  const int64_t blocks = full_rows ? (vocab + plan.vocab_block - 1) / plan.vocab_block : 1;
  plan.workspace_bytes = 4 * (blocks * 2 * rows * plan.vocab_block + rows * (d + d_t) +
                              (low_precision ? plan.vocab_block * (d + d_t) + (full_rows ? 0 : rows * plan.vocab_block) : 0));
  return plan;
}

bool fused_uses_full_rows(int64_t n, int64_t vocab, int64_t d, int64_t d_t, bool low_precision,
                          const Options& options) {
  // jsd's statistics need the full rows anyway; a forced chunk size (tests) keeps the full-row loop
  if (options.divergence == kJSD || env_chunk_override() > 0) return true;
  const Plan full = make_plan(n, vocab, d, d_t, low_precision, true, options.workspace_bytes);
  return full.chunk_rows >= std::min(n, kMinFullRows);
}

at::Tensor forward(const at::Tensor& hs, const at::Tensor& ht, const at::Tensor& w, const at::Tensor& wt,
                   const at::Tensor& bs, const at::Tensor& bt, const Options& options) {
  c10::NoGradGuard no_grad;  // the out= GEMMs refuse inputs that require grad; we are the gradient
  Problem p = make_problem(hs, ht, w, wt, bs, bt, options);
  at::Tensor stats = at::zeros({p.n, kNumStats}, at::TensorOptions().dtype(at::kFloat));
  Workspace ws(p, make_plan(p.n, p.vocab, p.d, p.d_t, p.low_precision, options.divergence == kJSD, options.workspace_bytes));
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
  if (!fused_uses_full_rows(p.n, p.vocab, p.d, p.d_t, p.low_precision, options)) {
    at::Tensor stats = forward(hs, ht, w, wt, bs, bt, options);
    return {stats, backward(hs, ht, w, wt, bs, bt, stats, grad_loss, grad_raw, need_hidden, need_weight, need_bias,
                            options)};
  }
  at::Tensor stats = at::zeros({p.n, kNumStats}, at::TensorOptions().dtype(at::kFloat));
  Grads grads = make_grads(p, need_hidden, need_weight, need_bias);
  Workspace ws(p, make_plan(p.n, p.vocab, p.d, p.d_t, p.low_precision, true, options.workspace_bytes));
  const int64_t block = ws.plan.vocab_block;
  for (int64_t row0 = 0; row0 < p.n; row0 += ws.plan.chunk_rows) {
    const int64_t rows = std::min(ws.plan.chunk_rows, p.n - row0);
    Chunk c = load_chunk(p, ws, row0, rows);
    chunk_statistics(p, ws, c, stats.data_ptr<float>());
    // Phase C, element-wise: every gradient tile of the chunk in one parallel region (the logits
    // are all stored), not one region per block: each region's join waits for the slowest thread,
    // and on a busy core that wait is a scheduler time slice (issue 16).
    const int64_t blocks = (p.vocab + block - 1) / block;
    const bool mixed = p.student_gemm_dtype != at::kFloat;
    for_each_row(rows, [&](int64_t r) {
      const float* stats_row = stats.data_ptr<float>() + (row0 + r) * kNumStats;
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t count = std::min(block, p.vocab - b * block);
        float* out = ws.logits.get() + b * ws.logits_block_stride;
        gradient_tile_row(p, ws, out, rows, count, r, stats_row, grad_loss.data_ptr<float>()[row0 + r],
                          raw_row(grad_raw, row0 + r), /*round=*/false);
      }
    });
    if (mixed) {
      // the tiles split into bf16 hi + lo, each pair into its block's teacher half (no longer needed)
      for_each_row(blocks * rows, [&](int64_t i) {
        const int64_t b = i / rows, r = i % rows, count = std::min(block, p.vocab - b * block);
        float* out = ws.logits.get() + b * ws.logits_block_stride;
        uint16_t* tiles = reinterpret_cast<uint16_t*>(out + rows * count);
        split_floats(p.student_gemm_dtype, out + r * count, tiles + r * count, tiles + (rows + r) * count, count);
      });
    }
    for (int64_t v0 = 0, b = 0; v0 < p.vocab; v0 += block, ++b) {
      const int64_t count = std::min(block, p.vocab - v0);
      float* out = ws.logits.get() + b * ws.logits_block_stride;
      at::Tensor w_block = weight_block(p.weight, p.student_gemm_dtype, ws.weight_block.get(), v0, count);
      apply_gradient_block(p, ws, c, w_block, out, v0, count, row0 == 0, grads, mixed ? out + rows * count : nullptr);
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
  Workspace ws(p, make_plan(p.n, p.vocab, p.d, p.d_t, p.low_precision, false, options.workspace_bytes));
  const int64_t block = ws.plan.vocab_block;
  for (int64_t row0 = 0; row0 < p.n; row0 += ws.plan.chunk_rows) {
    const int64_t rows = std::min(ws.plan.chunk_rows, p.n - row0);
    Chunk c = load_chunk(p, ws, row0, rows);
    for (int64_t v0 = 0; v0 < p.vocab; v0 += block) {
      const int64_t count = std::min(block, p.vocab - v0);
      float* out = ws.logits.get();
      at::Tensor w_block = block_logits(p, ws, c, v0, count, out);
      for_each_row(rows, [&](int64_t r) {
        transform_rows(p, out, rows, v0, count, r);
        gradient_tile_row(p, ws, out, rows, count, r, stats.data_ptr<float>() + (row0 + r) * kNumStats,
                          grad_loss.data_ptr<float>()[row0 + r], raw_row(grad_raw, row0 + r));
      });
      apply_gradient_block(p, ws, c, w_block, out, v0, count, row0 == 0, grads);
    }
  }
  return grads;
}

}  // namespace crisp_native
