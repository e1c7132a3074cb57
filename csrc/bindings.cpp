// Python bindings: the module `crisp_fast._native` (wrapped by crisp_fast/backends/native.py).
#include <torch/extension.h>

#include <optional>
#include <string>

#include "fused_divergence.h"

namespace {

using crisp_native::Options;

Options make_options(const std::string& divergence, double beta, double temperature, double student_scale,
                     double teacher_scale, std::optional<double> student_softcap, std::optional<double> teacher_softcap,
                     bool need_raw_lse) {
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
  return o;
}

at::Tensor or_undefined(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

std::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "crisp-fast native CPU backend: fused linear divergence (ATen BLAS GEMMs + fused OpenMP epilogue)";

  m.def("forward",
        [](const at::Tensor& hs, const at::Tensor& ht, const at::Tensor& w, const std::optional<at::Tensor>& wt,
           const std::optional<at::Tensor>& bs, const std::optional<at::Tensor>& bt, const std::string& divergence,
           double beta, double temperature, double student_scale, double teacher_scale,
           std::optional<double> student_softcap, std::optional<double> teacher_softcap, bool need_raw_lse) {
          pybind11::gil_scoped_release no_gil;
          return crisp_native::forward(hs, ht, w, or_undefined(wt), or_undefined(bs), or_undefined(bt),
                                       make_options(divergence, beta, temperature, student_scale, teacher_scale,
                                                    student_softcap, teacher_softcap, need_raw_lse));
        });

  m.def("backward",
        [](const at::Tensor& hs, const at::Tensor& ht, const at::Tensor& w, const std::optional<at::Tensor>& wt,
           const std::optional<at::Tensor>& bs, const std::optional<at::Tensor>& bt, const at::Tensor& stats,
           const at::Tensor& grad_loss, const std::optional<at::Tensor>& grad_raw_lse, bool need_hidden,
           bool need_weight, bool need_bias, const std::string& divergence, double beta, double temperature,
           double student_scale, double teacher_scale, std::optional<double> student_softcap,
           std::optional<double> teacher_softcap, bool need_raw_lse) {
          pybind11::gil_scoped_release no_gil;
          auto g = crisp_native::backward(hs, ht, w, or_undefined(wt), or_undefined(bs), or_undefined(bt), stats,
                                          grad_loss, or_undefined(grad_raw_lse), need_hidden, need_weight, need_bias,
                                          make_options(divergence, beta, temperature, student_scale, teacher_scale,
                                                       student_softcap, teacher_softcap, need_raw_lse));
          return std::make_tuple(maybe(g.hidden), maybe(g.weight), maybe(g.bias));
        });

  m.def("forward_backward",
        [](const at::Tensor& hs, const at::Tensor& ht, const at::Tensor& w, const std::optional<at::Tensor>& wt,
           const std::optional<at::Tensor>& bs, const std::optional<at::Tensor>& bt, const at::Tensor& grad_loss,
           const std::optional<at::Tensor>& grad_raw_lse, bool need_hidden, bool need_weight, bool need_bias,
           const std::string& divergence, double beta, double temperature, double student_scale, double teacher_scale,
           std::optional<double> student_softcap, std::optional<double> teacher_softcap, bool need_raw_lse) {
          pybind11::gil_scoped_release no_gil;
          auto [stats, g] = crisp_native::forward_backward(
              hs, ht, w, or_undefined(wt), or_undefined(bs), or_undefined(bt), grad_loss, or_undefined(grad_raw_lse),
              need_hidden, need_weight, need_bias,
              make_options(divergence, beta, temperature, student_scale, teacher_scale, student_softcap,
                           teacher_softcap, need_raw_lse));
          return std::make_tuple(stats, std::make_tuple(maybe(g.hidden), maybe(g.weight), maybe(g.bias)));
        });

  m.def("plan",
        [](int64_t n, int64_t vocab, int64_t d, int64_t d_t, bool low_precision, bool full_rows) {
          auto plan = crisp_native::make_plan(n, vocab, d, d_t, low_precision, full_rows);
          return pybind11::dict(pybind11::arg("chunk_rows") = plan.chunk_rows,
                                pybind11::arg("vocab_block") = plan.vocab_block,
                                pybind11::arg("full_rows") = plan.full_rows,
                                pybind11::arg("workspace_bytes") = plan.workspace_bytes);
        },
        "How a call with these sizes is tiled and the scratch bytes it holds beyond its outputs.");
}
