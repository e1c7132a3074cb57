"""CUDA-only checks of the Triton backend, compiled for the real GPU (skipped without one): the
compiled kernels against the float64 truth in bf16 and fp32, bitwise repeatability, and the
memory contract measured with the CUDA allocator. `make gpu-check` runs this file (with
TRITON_INTERPRET=0); on CPU every test here is skipped with the reason.

    TRITON_INTERPRET=0 python -m pytest -q tests/test_cuda.py
"""
from __future__ import annotations

import inspect
import os

import pytest
import torch

import crisp_fast
from crisp_fast import reference

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the compiled Triton kernels)"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="TRITON_INTERPRET=1 replaces the compiler; run with TRITON_INTERPRET=0"),
]

# max-normalised relative error against float64 on the same input values. fp32 runs the GEMMs as
# 3xTF32 (~fp32 accuracy); bf16 inputs give bf16 gradients, one rounding of 2^-8 relative.
TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 1e-2}
DIVERGENCES = [("reverse_kl", 1.0), ("forward_kl", 0.0), ("jsd", 0.3)]


def _problem(n, d, v, *, dtype, d_t=None, bias=False, spread=1.0):
    """Inputs on the GPU with logits of a few nats; teacher close to the student; separate head if d_t."""
    weight = torch.randn(v, d, device="cuda") * spread / d ** 0.5
    student = torch.randn(n, d, device="cuda")
    inputs = dict(student_hidden=student.to(dtype).requires_grad_(), lm_head_weight=weight.to(dtype).requires_grad_())
    if d_t is None:
        inputs["teacher_hidden"] = (student + 0.5 * torch.randn_like(student)).to(dtype)
    else:
        inputs["teacher_hidden"] = torch.randn(n, d_t, device="cuda").to(dtype)
        inputs["teacher_lm_head_weight"] = (torch.randn(v, d_t, device="cuda") * spread / d_t ** 0.5).to(dtype)
    if bias:
        inputs["student_bias"] = torch.randn(v, device="cuda").requires_grad_()
        inputs["teacher_bias"] = torch.randn(v, device="cuda")
    return inputs


def _float64(inputs):
    return {key: value.detach().double().requires_grad_(value.requires_grad) for key, value in inputs.items()}


def _loss_and_grads(fn, inputs, **options):
    loss = fn(**inputs, **options)
    loss.backward()
    leaves = [key for key in ("student_hidden", "lm_head_weight", "student_bias") if key in inputs]
    return loss.detach(), {key: inputs[key].grad for key in leaves}


def _rel(value, truth):
    value, truth = value.double(), truth.double()
    return ((value - truth).abs().max() / truth.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("shape", [dict(n=777, d=320, v=5003), dict(n=64, d=128, v=151_936),
                                   dict(n=300, d=256, v=4099, d_t=192, bias=True)],
                         ids=["odd", "qwen-vocab", "separate-head-bias"])
def test_compiled_kernels_match_float64(seed, dtype, divergence, beta, shape):
    shape = dict(shape)
    n, d, v = shape.pop("n"), shape.pop("d"), shape.pop("v")
    inputs = _problem(n, d, v, dtype=dtype, **shape)
    options = dict(divergence=divergence, beta=beta, temperature=1.3, reduction="mean")
    loss, grads = _loss_and_grads(crisp_fast.fused_linear_divergence, inputs, backend="triton", **options)
    truth = _float64(inputs)
    ref_loss, ref_grads = _loss_and_grads(reference.fused_linear_divergence, truth, **options)
    assert torch.isfinite(loss).all()
    assert _rel(loss, ref_loss) < TOLERANCE[dtype], (loss.item(), ref_loss.item())
    for name, grad in grads.items():
        assert grad is not None and grad.dtype == inputs[name].dtype and grad.device.type == "cuda", name
        assert _rel(grad, ref_grads[name]) < TOLERANCE[dtype], (name, _rel(grad, ref_grads[name]))


def test_token_statistics_match_float64(seed):
    inputs = _problem(129, 256, 32_771, dtype=torch.bfloat16)
    per_token, stats = crisp_fast.fused_linear_divergence(**inputs, backend="triton", reduction="none",
                                                          temperature=0.7, return_stats=True)
    truth = _float64(inputs)
    expected = reference.token_statistics(truth["student_hidden"], truth["teacher_hidden"], truth["lm_head_weight"],
                                          temperature=0.7)
    for field in ("student_lse", "teacher_lse", "student_entropy"):
        assert _rel(getattr(stats, field), expected[field]) < 1e-4, field
    ref = reference.fused_linear_divergence(**truth, reduction="none", temperature=0.7)
    assert _rel(per_token, ref) < 1e-3


def test_forward_is_bitwise_repeatable(seed):
    """The statistics (the forward, merged over vocabulary splits) come out identical run to run."""
    inputs = _problem(2048, 512, 65_536, dtype=torch.bfloat16)
    with torch.no_grad():
        first = crisp_fast.fused_linear_divergence(**inputs, backend="triton", reduction="none")
        for _ in range(2):
            assert torch.equal(crisp_fast.fused_linear_divergence(**inputs, backend="triton", reduction="none"), first)


def test_deterministic_backward_is_bitwise_repeatable(seed):
    if "deterministic" not in inspect.signature(crisp_fast.fused_linear_divergence).parameters:
        pytest.skip("this version's fused_linear_divergence has no deterministic= option (issue 13)")
    base = _problem(1024, 512, 50_000, dtype=torch.bfloat16)
    runs = []
    for _ in range(3):
        inputs = {key: value.detach().clone().requires_grad_(value.requires_grad) for key, value in base.items()}
        runs.append(_loss_and_grads(crisp_fast.fused_linear_divergence, inputs, backend="triton", deterministic=True))
    (loss, grads), rest = runs[0], runs[1:]
    for other_loss, other_grads in rest:
        assert torch.equal(other_loss, loss)
        for name in grads:
            assert torch.equal(other_grads[name], grads[name]), f"{name} differs between deterministic runs"
    ref_loss, ref_grads = _loss_and_grads(reference.fused_linear_divergence, _float64(base))
    for name in grads:
        assert _rel(grads[name], ref_grads[name]) < TOLERANCE[torch.bfloat16], name


def _peak_over_inputs(inputs, **options) -> int:
    """max_memory_allocated during forward + backward, minus what the inputs hold."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    loss = crisp_fast.fused_linear_divergence(**inputs, backend="triton", **options)
    loss.backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - baseline


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_memory_contract_measured_by_the_cuda_allocator(seed, dtype):
    """No tokens x vocabulary tensor: peak memory over the inputs is the gradients (accumulated in
    fp32, then handed back in the input dtype) plus small per-token state, and grows with N by
    O(D) per token, not O(V)."""
    d, v = 1024, 65_536
    peaks = {}
    for n in (2048, 8192):
        inputs = _problem(n, d, v, dtype=dtype)
        peaks[n] = _peak_over_inputs(inputs)
        size = torch.tensor([], dtype=dtype).element_size()
        fp32_grads = 4 * (v * d + n * d)
        returned = size * (v * d + n * d) if dtype != torch.float32 else 0  # the cast copy, bf16 only
        bound = 1.1 * (fp32_grads + returned) + 64 * 2 ** 20
        assert peaks[n] <= bound, (n, peaks[n] / 2 ** 20, bound / 2 ** 20)
        del inputs
    one_logits_row = v * 4  # a single fp32 logits row per token would already be this per token
    growth_per_token = (peaks[8192] - peaks[2048]) / (8192 - 2048)
    assert growth_per_token < 0.1 * one_logits_row, (growth_per_token, one_logits_row)
