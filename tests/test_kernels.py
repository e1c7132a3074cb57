"""The Triton backend (kernels/ + crisp_fast/backends/triton.py) through the public API, on CPU
tensors under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), against
`crisp_fast.reference` in float64 on the same inputs. Budget: well under 3 minutes on 2 cores.

    PYTHONPATH=. python -m pytest -q tests/test_kernels.py
"""
from __future__ import annotations

import time

import pytest
import torch

import crisp_fast
from crisp_fast import reference
from crisp_fast.backends import triton as triton_backend

pytestmark = pytest.mark.skipif(not triton_backend.is_available()[0], reason=triton_backend.is_available()[1])


def _openblas_thread_controls():
    """(get, set) of the OpenBLAS that numpy loaded, or None. The interpreter runs each tl.dot as a
    small numpy matmul; multi-threaded OpenBLAS on a busy 2-core machine makes those ~30x slower."""
    import ctypes

    import numpy  # noqa: F401  (loads its OpenBLAS)

    try:
        paths = {line.split()[-1] for line in open("/proc/self/maps") if "openblas" in line.lower()}
    except OSError:
        return None
    for path in paths:
        lib = ctypes.CDLL(path)
        for prefix, suffix in (("scipy_openblas_", "64_"), ("openblas_", "")):
            getter = getattr(lib, f"{prefix}get_num_threads{suffix}", None)
            setter = getattr(lib, f"{prefix}set_num_threads{suffix}", None)
            if getter and setter:
                return getter, setter
    return None


@pytest.fixture(autouse=True, scope="module")
def _single_thread_blas():
    controls = _openblas_thread_controls()
    if controls is None:
        yield
        return
    getter, setter = controls
    before = getter()
    setter(1)
    yield
    setter(before)


def _launchers():
    try:
        from crisp_fast.kernels import divergence_backward, divergence_forward
    except ImportError:
        from kernels import divergence_backward, divergence_forward
    return divergence_forward, divergence_backward


def _problem(n, d, v, *, d_t=None, shared=True, bias=False, dtype=torch.float32, spread=0.4):
    """Random inputs with logits of a realistic spread (a few nats), student leaves requiring grad."""
    d_t = d if shared else (d_t or d)
    inputs = dict(
        student_hidden=torch.randn(n, d).to(dtype).requires_grad_(),
        teacher_hidden=torch.randn(n, d_t).to(dtype),
        lm_head_weight=(torch.randn(v, d) * spread / d ** 0.25).to(dtype).requires_grad_(),
        teacher_lm_head_weight=None if shared else (torch.randn(v, d_t) * spread / d_t ** 0.25).to(dtype),
    )
    if bias:
        inputs["student_bias"] = torch.randn(v).requires_grad_()
        inputs["teacher_bias"] = torch.randn(v)
    return inputs


def _as(inputs, dtype):
    """Same values in another dtype (fresh leaves for the student side)."""
    out = {}
    for name, value in inputs.items():
        if value is None:
            out[name] = None
            continue
        out[name] = value.detach().to(dtype).requires_grad_(value.requires_grad)
    return out


def _run(fn, inputs, upstream=None, **options):
    """Loss and the gradients of the student leaves (hidden, weight, bias)."""
    loss = fn(**inputs, **options)
    loss.backward(upstream if upstream is not None else torch.ones_like(loss))
    leaves = [inputs["student_hidden"], inputs["lm_head_weight"], inputs.get("student_bias")]
    return loss.detach(), [None if leaf is None else leaf.grad for leaf in leaves]


def _triton(**inputs_and_options):
    return crisp_fast.fused_linear_divergence(**inputs_and_options, backend="triton")


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _check_fp32(inputs, upstream=None, tol=2e-5, **options):
    loss, grads = _run(_triton, inputs, upstream, **options)
    truth = _as(inputs, torch.float64)
    # the reference's backward turns NaN in dropped rows into NaN weight gradients (0 * NaN); it
    # is the specification of the counted rows only, so feed it zeros there
    truth["student_hidden"] = truth["student_hidden"].detach().nan_to_num(0.0).requires_grad_()
    ref_loss, ref_grads = _run(reference.fused_linear_divergence, truth,
                               None if upstream is None else upstream.double(), **options)
    assert torch.isfinite(loss).all()
    assert _rel(loss, ref_loss) < tol, (loss, ref_loss)
    for name, grad, ref in zip(("student_hidden", "lm_head_weight", "student_bias"), grads, ref_grads):
        if ref is not None:
            assert grad is not None and grad.dtype == inputs[name].dtype
            assert _rel(grad, ref) < tol, (name, _rel(grad, ref))


DIVERGENCES = [("reverse_kl", 1.0), ("forward_kl", 0.0), ("jsd", 0.3)]


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("shared", [True, False], ids=["shared_w", "separate_w"])
def test_fp32_matches_float64_reference(seed, divergence, beta, shared):
    """Odd N, D, Dt != D, V not a multiple of any block; temperature, scales, softcaps, biases."""
    inputs = _problem(13, 37, 301, d_t=29, shared=shared, bias=True)
    _check_fp32(inputs, divergence=divergence, beta=beta, temperature=1.7, student_logit_scale=1.3,
                teacher_logit_scale=0.8, student_softcap=5.0, teacher_softcap=4.0)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_plain_options_and_mean_reduction(seed, divergence, beta):
    inputs = _problem(24, 64, 257)
    _check_fp32(inputs, divergence=divergence, beta=beta, reduction="mean")


def test_reduction_none_random_upstream_and_mask(seed):
    inputs = _problem(19, 33, 203, shared=False, d_t=45, bias=True)
    mask = torch.rand(19) > 0.35
    mask[0] = True
    inputs["student_hidden"].data[~mask] = float("nan")  # dropped rows must not leak
    upstream = torch.randn(19)
    _check_fp32(inputs, upstream=upstream, reduction="none", mask=mask, divergence="jsd", beta=0.6,
                temperature=0.7, student_softcap=3.0)


def test_token_weights_sum(seed):
    inputs = _problem(11, 20, 150)
    _check_fp32(inputs, reduction="sum", token_weights=torch.rand(11), temperature=2.0)


@pytest.mark.parametrize("temperature", [1.0, 1.9])
def test_raw_lse_term(seed, temperature):
    """need_raw_lse: total = loss + sum_i r_i logsumexp(y_s,i) (untempered capped logits) and its gradient."""
    inputs = _problem(10, 24, 211, bias=True)
    coeff = torch.randn(10)
    options = dict(temperature=temperature, student_softcap=6.0, student_logit_scale=1.1)
    total = crisp_fast.fused_linear_divergence(**inputs, **options, backend="triton", _raw_lse_coeff=coeff)
    total.backward()
    grads = [inputs[k].grad for k in ("student_hidden", "lm_head_weight", "student_bias")]
    truth = _as(inputs, torch.float64)
    ref = reference.fused_linear_divergence(**truth, **options)
    raw = reference.logits(truth["student_hidden"], truth["lm_head_weight"], truth["student_bias"],
                           logit_scale=1.1, softcap=6.0).logsumexp(-1)
    ref_total = ref + (coeff.double() * raw).sum()
    ref_total.backward()
    assert _rel(total, ref_total) < 2e-5
    for grad, name in zip(grads, ("student_hidden", "lm_head_weight", "student_bias")):
        assert _rel(grad, truth[name].grad) < 2e-5, name


def test_stats_columns(seed):
    inputs = _problem(9, 31, 180, shared=False, d_t=17, bias=True)
    options = dict(temperature=1.3, student_softcap=4.0, teacher_logit_scale=1.2)
    _, stats = crisp_fast.fused_linear_divergence(**inputs, **options, divergence="forward_kl",
                                                  backend="triton", return_stats=True)
    truth = _as(inputs, torch.float64)
    expected = reference.token_statistics(**truth, **{k: v for k, v in options.items()},)
    assert _rel(stats.student_lse, expected["student_lse"]) < 1e-5
    assert _rel(stats.teacher_lse, expected["teacher_lse"]) < 1e-5
    assert _rel(stats.student_entropy, expected["student_entropy"]) < 1e-5
    per_row = reference.fused_linear_divergence(**truth, **options, divergence="forward_kl", reduction="none")
    assert _rel(stats.divergence, per_row) < 2e-5


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_vocabulary_split_merge(seed, divergence, beta):
    """The GPU path splits V over programs and merges partial softmax sums; force it here."""
    forward, _ = _launchers()
    inputs = _problem(21, 40, 600, bias=True)
    h_s, h_t, w = (inputs[k].detach() for k in ("student_hidden", "teacher_hidden", "lm_head_weight"))
    b_s, b_t = inputs["student_bias"].detach(), inputs["teacher_bias"].detach()
    options = dict(divergence=divergence, beta=beta, temperature=1.4, student_softcap=5.0, need_raw_lse=True)
    one = forward.divergence_forward(h_s, h_t, w, None, b_s, b_t, **options)
    # 5 vocabulary tiles in 3 splits: the last split is short
    config = dict(BT=32, BV=128, BK=64, num_warps=4, num_stages=1, tiles_per_split=2, splits=3)
    split = forward.divergence_forward(h_s, h_t, w, None, b_s, b_t, **options, config=config)
    assert torch.allclose(split, one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 1.0), ("jsd", 0.5)])
def test_half_precision_no_worse_than_fp32_upcast_torch(seed, dtype, divergence, beta):
    """Cut Cross-Entropy's test method: error vs the fp64 truth (on the same half-precision values)
    is bounded by that of a plain PyTorch implementation that upcasts to fp32."""
    inputs = _problem(16, 48, 333, dtype=dtype, shared=False, d_t=40)
    options = dict(divergence=divergence, beta=beta, temperature=1.2)
    loss, grads = _run(_triton, inputs, **options)
    truth = _as(inputs, torch.float64)
    ref_loss, ref_grads = _run(reference.fused_linear_divergence, truth, **options)
    upcast = _as(inputs, torch.float32)
    up_loss, up_grads = _run(reference.fused_linear_divergence, upcast, **options)
    assert _rel(loss, ref_loss) <= 2 * _rel(up_loss, ref_loss) + 1e-6
    for grad, up, ref in zip(grads, up_grads, ref_grads):
        if ref is None:
            continue
        assert grad.dtype == dtype
        # both round to `dtype` at the end; the fp32 path's own rounding sets the bar
        assert _rel(grad, ref) <= 1.5 * _rel(up.to(dtype), ref) + 1e-6


def test_full_qwen_vocabulary_tiny_rows(seed):
    """V = 151,936 (Qwen3) with tiny N and D: many vocabulary tiles, one partial last tile."""
    inputs = _problem(3, 8, 151_936, bias=True)
    start = time.perf_counter()
    _check_fp32(inputs, temperature=1.5, tol=5e-5)
    assert time.perf_counter() - start < 60


def test_float64_is_refused_and_backend_reports(seed):
    inputs = _as(_problem(4, 8, 32), torch.float64)
    with pytest.raises(TypeError, match="float64"):
        crisp_fast.fused_linear_divergence(**inputs, backend="triton")
    available, why = triton_backend.is_available()
    assert available and "ok" in why


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy notices the NaN inside the interpreter
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_counted_row_propagates(seed, bad):
    inputs = _problem(6, 16, 100)
    inputs["student_hidden"].data[2, 3] = bad
    per_row = crisp_fast.fused_linear_divergence(**inputs, backend="triton", reduction="none")
    assert not torch.isfinite(per_row[2])
    assert torch.isfinite(per_row[[0, 1, 3, 4, 5]]).all()  # rows never mix
