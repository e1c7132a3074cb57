// Python bindings: the module `crisp_fast._native` (wrapped by crisp_fast/backends/native.py).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <optional>
#include <string>

#include "fused_divergence.h"
#include "gemm.h"
#include "stats_layout.h"

namespace {

using crisp_native::Options;

Options make_options(const std::string& divergence, double beta, double temperature, double student_scale,
                     double teacher_scale, std::optional<double> student_softcap, std::optional<double> teacher_softcap,
                     bool need_raw_lse, bool deterministic, int64_t workspace_bytes) {
  Options o;
  if (divergence == "reverse_kl") o.divergence = crisp_native::kReverseKL;
  else if (divergence == "forward_kl") o.divergence = crisp_native::kForwardKL;
  else if (divergence == "jsd") o.divergence = crisp_native::kJSD;
  else TORCH_CHECK(false, "native backend: divergence must be reverse_kl, forward_kl or jsd, got '", divergence, "'");
  TORCH_CHECK(beta >= 0.0 && beta <= 1.0, "native backend: beta must be in [0, 1], got ", beta);
  TORCH_CHECK(temperature > 0.0, "native backend: temperature must be > 0, got ", temperature);
  TORCH_CHECK(!student_softcap || *student_softcap > 0.0, "native backend: student_softcap must be > 0");
  TORCH_CHECK(!teacher_softcap || *teacher_softcap > 0.0, "native backend: teacher_softcap must be > 0");
  o.beta = beta;
  o.temperature = temperature;
  o.student_scale = student_scale;
  o.teacher_scale = teacher_scale;
  o.student_softcap = student_softcap.value_or(0.0);
  o.teacher_softcap = teacher_softcap.value_or(0.0);
  o.need_raw_lse = need_raw_lse;
  o.deterministic = deterministic;
  TORCH_CHECK(workspace_bytes >= -1, "native backend: workspace_bytes must be >= 0 (or -1: the default)");
  o.workspace_bytes = workspace_bytes;
  return o;
}

at::Tensor or_undefined(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

std::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// What this module was compiled with (setup.py passes its flags in CRISP_NATIVE_BUILD_FLAGS).
#ifndef CRISP_NATIVE_BUILD_FLAGS
#define CRISP_NATIVE_BUILD_FLAGS "unknown (built outside setup.py)"
#endif

std::string march_level() {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  return "x86-64-v4 (AVX-512)";
#elif defined(__AVX2__) && defined(__FMA__)
  return "x86-64-v3 (AVX2, FMA)";
#elif defined(__x86_64__)
  return "x86-64 baseline (SSE2)";
#elif defined(__aarch64__)
  return "aarch64";
#else
  return "unknown";
#endif
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["compiler"] = std::string(__VERSION__);
  info["flags"] = std::string(CRISP_NATIVE_BUILD_FLAGS);
  info["march"] = march_level();
  info["blas"] = std::string(at::hasMKL() ? "MKL" : "non-MKL BLAS") + (at::hasMKLDNN() ? " + oneDNN" : "");
  info["threads"] = at::get_num_threads();
  info["parallel"] = at::get_parallel_info();
  info["low_precision_gemm"] = crisp_native::low_precision_gemm();
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "crisp-fast native CPU backend: fused linear divergence (ATen BLAS GEMMs + fused OpenMP epilogue)";

  m.def("forward",
        [](const at::Tensor& hs, const at::Tensor& ht, const at::Tensor& w, const std::optional<at::Tensor>& wt,
           const std::optional<at::Tensor>& bs, const std::optional<at::Tensor>& bt, const std::string& divergence,
           double beta, double temperature, double student_scale, double teacher_scale,
           std::optional<double> student_softcap, std::optional<double> teacher_softcap, bool need_raw_lse, bool deterministic,
           int64_t workspace_bytes) {
          pybind11::gil_scoped_release no_gil;
          return crisp_native::forward(hs, ht, w, or_undefined(wt), or_undefined(bs), or_undefined(bt),
                                       make_options(divergence, beta, temperature, student_scale, teacher_scale,
                                                    student_softcap, teacher_softcap, need_raw_lse, deterministic, workspace_bytes));
        });

  m.def("backward",
        [](const at::Tensor& hs, const at::Tensor& ht, const at::Tensor& w, const std::optional<at::Tensor>& wt,
           const std::optional<at::Tensor>& bs, const std::optional<at::Tensor>& bt, const at::Tensor& stats,
           const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_raw_lse, bool need_hidden,
           bool need_weight, bool need_bias, const std::string& divergence, double beta, double temperature,
           double student_scale, double teacher_scale, std::optional<double> student_softcap,
           std::optional<double> teacher_softcap, bool need_raw_lse, bool deterministic,
           int64_t workspace_bytes) {
          pybind11::gil_scoped_release no_gil;
          auto g = crisp_native::backward(hs, ht, w, or_undefined(wt), or_undefined(bs), or_undefined(bt), stats,
                                          grad_loss, or_undefined(grad_raw_lse), need_hidden, need_weight, need_bias,
                                          make_options(divergence, beta, temperature, student_scale, teacher_scale,
                                                       student_softcap, teacher_softcap, need_raw_lse, deterministic, workspace_bytes));
          return std::make_tuple(maybe(g.hidden), maybe(g.weight), maybe(g.bias));
        });

  m.def("forward_backward",
        [](const at::Tensor& hs, const at::Tensor& ht, const at::Tensor& w, const std::optional<at::Tensor>& wt,
           const std::optional<at::Tensor>& bs, const std::optional<at::Tensor>& bt, const at::Tensor& grad_loss,
           const std::optional<at::Tensor>& grad_raw_lse, bool need_hidden, bool need_weight, bool need_bias,
           const std::string& divergence, double beta, double temperature, double student_scale, double teacher_scale,
           std::optional<double> student_softcap, std::optional<double> teacher_softcap, bool need_raw_lse, bool deterministic,
           int64_t workspace_bytes) {
          pybind11::gil_scoped_release no_gil;
          auto [stats, g] = crisp_native::forward_backward(
              hs, ht, w, or_undefined(wt), or_undefined(bs), or_undefined(bt), grad_loss, or_undefined(grad_raw_lse),
              need_hidden, need_weight, need_bias,
              make_options(divergence, beta, temperature, student_scale, teacher_scale, student_softcap,
                           teacher_softcap, need_raw_lse, deterministic, workspace_bytes));
          return std::make_tuple(stats, std::make_tuple(maybe(g.hidden), maybe(g.weight), maybe(g.bias)));
        });

  m.def("stats_layout", [] {
    pybind11::dict layout;
    for (const auto& column : crisp_native::kStatNames) layout[column.name] = column.value;
    return layout;
  }, "The stats columns this module was compiled with (csrc/stats_layout.h), {name: index}.");

  m.def("build_info", &build_info, "Compiler, flags, -march level, BLAS, threads and GEMM path of this build.");

  m.def("plan",
        [](int64_t n, int64_t vocab, int64_t d, int64_t d_t, bool low_precision, bool full_rows,
           int64_t workspace_bytes) {
          auto plan = crisp_native::make_plan(n, vocab, d, d_t, low_precision, full_rows, workspace_bytes);
          return pybind11::dict(pybind11::arg("chunk_rows") = plan.chunk_rows,
                                pybind11::arg("vocab_block") = plan.vocab_block,
                                pybind11::arg("full_rows") = plan.full_rows,
                                pybind11::arg("workspace_bytes") = plan.workspace_bytes);
        },
        "How a call with these sizes is tiled and the scratch bytes it holds beyond its outputs.");

  m.def("fused_uses_full_rows",
        [](int64_t n, int64_t vocab, int64_t d, int64_t d_t, bool low_precision, int64_t workspace_bytes) {
          Options o;
          o.workspace_bytes = workspace_bytes;
          return crisp_native::fused_uses_full_rows(n, vocab, d, d_t, low_precision, o);
        },
        "Whether forward_backward keeps full rows (4 GEMMs) or streams (6 GEMMs) at these sizes.");
}
