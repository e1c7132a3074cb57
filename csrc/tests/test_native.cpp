// Standalone C++ check of the native backend (no Python): statistics and gradients of a small
// random problem against ATen float64 formulas, and forward / backward / forward_backward agreeing.
// Built and run by the top-level CMakeLists.txt:  cmake -S . -B build/cmake && cmake --build build/cmake && ctest --test-dir build/cmake
#include <ATen/ATen.h>

#include <cstdio>
#include <tuple>
#include <string>

#include "fused_divergence.h"

namespace {

int failures = 0;

void expect_close(const at::Tensor& got, const at::Tensor& want, double tolerance, const std::string& what) {
  const double error = (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>();
  const double scale = std::max(1.0, want.abs().max().item<double>());
  const bool ok = error <= tolerance * scale;
  std::printf("%-40s max error %.3e %s\n", what.c_str(), error, ok ? "ok" : "FAIL");
  if (!ok) ++failures;
}

}  // namespace

int main() {
  at::manual_seed(1234);
  const int64_t n = 37, d = 24, vocab = 17000;  // vocabulary spans 3 blocks, the last one ragged
  at::Tensor hs = at::randn({n, d}), ht = at::randn({n, d}), w = at::randn({vocab, d}) * 0.4;
  at::Tensor bias = at::randn({vocab});
  crisp_native::Options options;
  options.temperature = 1.3;
  options.student_softcap = 8.0;

  // float64 truth: y = cap tanh((h W^T + b) / cap), x = y / T
  auto logits = [&](const at::Tensor& h, const at::Tensor* b, double cap) {
    at::Tensor z = at::matmul(h.to(at::kDouble), w.to(at::kDouble).t());
    if (b) z = z + b->to(at::kDouble);
    if (cap > 0) z = cap * at::tanh(z / cap);
    return z / options.temperature;
  };
  at::Tensor xs = logits(hs, &bias, options.student_softcap), xt = logits(ht, nullptr, 0.0);
  at::Tensor log_p = at::log_softmax(xs, 1), log_q = at::log_softmax(xt, 1), p = log_p.exp();
  at::Tensor kl = (p * (log_p - log_q)).sum(1);

  at::Tensor stats = crisp_native::forward(hs, ht, w, at::Tensor(), bias, at::Tensor(), options);
  expect_close(stats.select(1, crisp_native::kLoss), kl, 1e-5, "reverse KL");
  // the split log-sum-exps: the max is exact, max + log Z is the row's lse
  using namespace crisp_native;
  at::Tensor stats64 = stats.to(at::kDouble);
  expect_close(stats.select(1, kStudentMax), std::get<0>(xs.max(1)), 1e-6, "student max");
  expect_close(stats64.select(1, kStudentMax) + stats64.select(1, kStudentLogZ), at::logsumexp(xs, 1), 1e-6,
               "student lse");
  expect_close(stats64.select(1, kTeacherMax) + stats64.select(1, kTeacherLogZ), at::logsumexp(xt, 1), 1e-6,
               "teacher lse");
  expect_close(stats.select(1, kStudentEntropy), -(p * log_p).sum(1), 1e-5, "student entropy");
  expect_close(stats.select(1, kTeacherEntropy), -(log_q.exp() * log_q).sum(1), 1e-5, "teacher entropy");

  // gradient wrt the pre-activation a: grad_loss * g / T * (1 - tanh^2), g = p (log p - log q - KL)
  at::Tensor grad_loss = at::rand({n});
  at::Tensor tanh_value = xs * options.temperature / options.student_softcap;
  at::Tensor g = p * (log_p - log_q - kl.unsqueeze(1)) * grad_loss.to(at::kDouble).unsqueeze(1) /
                 options.temperature * (1 - tanh_value * tanh_value);
  at::Tensor want_dh = at::matmul(g, w.to(at::kDouble)), want_dw = at::matmul(g.t(), hs.to(at::kDouble));

  auto [fb_stats, fb] = crisp_native::forward_backward(hs, ht, w, at::Tensor(), bias, at::Tensor(), grad_loss,
                                                       at::Tensor(), true, true, true, options);
  expect_close(fb_stats, stats, 1e-6, "forward_backward stats == forward");
  expect_close(fb.hidden, want_dh, 1e-5, "forward_backward grad hidden");
  expect_close(fb.weight, want_dw, 1e-5, "forward_backward grad weight");
  expect_close(fb.bias, g.sum(0), 1e-5, "forward_backward grad bias");

  crisp_native::Grads bw = crisp_native::backward(hs, ht, w, at::Tensor(), bias, at::Tensor(), stats, grad_loss,
                                                  at::Tensor(), true, true, true, options);
  expect_close(bw.hidden, want_dh, 1e-5, "backward grad hidden");
  expect_close(bw.weight, want_dw, 1e-5, "backward grad weight");

  crisp_native::Plan plan = crisp_native::make_plan(16384, 151936, 1024, 1024, false, true);
  const double gradients = 4.0 * (151936.0 * 1024 + 16384.0 * 1024);
  std::printf("plan N=16384 D=1024: %lld rows, scratch %.2fx gradients\n", static_cast<long long>(plan.chunk_rows),
              plan.workspace_bytes / gradients);
  if (plan.workspace_bytes > 0.5 * gradients) ++failures;

  std::printf(failures ? "%d FAILED\n" : "all passed\n", failures);
  return failures ? 1 : 0;
}
