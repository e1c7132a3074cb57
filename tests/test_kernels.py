"""Kernel-specific checks of the Triton launchers (kernels/), on CPU tensors under the Triton
interpreter (tests/conftest.py sets TRITON_INTERPRET=1): the stats layout they write, tile
configurations and split merges, the deterministic backward, and non-finite rows staying in their
row. The numeric conformance of the backend (every option, dtype and logit scale against a float64
truth) is tests/test_backends.py's. Budget: well under 2 minutes on 2 cores.

    PYTHONPATH=. python -m pytest -q tests/test_kernels.py
"""
from __future__ import annotations

import pytest
import torch

import crisp_fast
from crisp_fast import reference
from crisp_fast.backends import triton as triton_backend

pytestmark = [pytest.mark.skipif(not triton_backend.is_available()[0], reason=triton_backend.is_available()[1]),
              # numpy, running the interpreter, warns about the -inf/NaN lanes that tl.where discards
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]


def _kernels():
    try:
        from crisp_fast.kernels import divergence_backward, divergence_forward, stats_layout
    except ImportError:  # an uninstalled checkout
        from kernels import divergence_backward, divergence_forward, stats_layout
    return divergence_forward, divergence_backward, stats_layout


FORWARD, BACKWARD, LAYOUT = _kernels()


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


def _problem(n, d, v, *, bias=False, dtype=torch.float32, spread=0.4):
    """(h_s, h_t, W, b_s, b_t) with logits of a realistic spread (a few nats)."""
    h_s, h_t = torch.randn(n, d).to(dtype), torch.randn(n, d).to(dtype)
    weight = (torch.randn(v, d) * spread / d ** 0.25).to(dtype)
    b_s, b_t = (torch.randn(v), torch.randn(v)) if bias else (None, None)
    return h_s, h_t, weight, b_s, b_t


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _forward(problem, **options):
    h_s, h_t, weight, b_s, b_t = problem
    return FORWARD.divergence_forward(h_s, h_t, weight, None, b_s, b_t, **options)


def _backward(problem, stats, upstream, *, config=None, **options):
    h_s, h_t, weight, b_s, b_t = problem
    return BACKWARD.divergence_backward(h_s, h_t, weight, None, b_s, b_t, stats, upstream, None,
                                        need_grad_hidden=True, need_grad_weight=True, need_grad_bias=b_s is not None,
                                        config=config, **options)


def _float64_truth(problem, upstream, **options):
    """Per-row divergence and the gradients of sum(upstream * divergence), from crisp_fast.reference."""
    h_s, h_t, weight, b_s, b_t = (None if x is None else x.double() for x in problem)
    leaves = [x.requires_grad_() for x in (h_s, weight) + ((b_s,) if b_s is not None else ())]
    per_row = reference.fused_linear_divergence(h_s, h_t, weight, student_bias=b_s, teacher_bias=b_t,
                                                reduction="none", **options)
    (per_row * upstream.double()).sum().backward()
    return per_row.detach(), [leaf.grad for leaf in leaves]


DIVERGENCES = [("reverse_kl", 1.0), ("forward_kl", 0.0), ("jsd", 0.3)]


def test_stats_layout_columns(seed):
    """Every column of the new layout: split log-sum-exps, both entropies, the raw student lse."""
    problem = _problem(9, 31, 180, bias=True)
    options = dict(temperature=1.3, student_softcap=4.0)
    stats = _forward(problem, divergence="forward_kl", need_raw_lse=True, **options)
    assert stats.shape == (9, LAYOUT.NUM_STATS) and stats.dtype == torch.float32
    h_s, h_t, weight, b_s, b_t = (x.double() for x in problem)
    y_s = reference.logits(h_s, weight, b_s, softcap=4.0)
    x_s, x_t = y_s / 1.3, reference.logits(h_t, weight, b_t) / 1.3
    for x, top, log_z, entropy in ((x_s, LAYOUT.STUDENT_MAX, LAYOUT.STUDENT_LOG_Z, LAYOUT.STUDENT_ENTROPY),
                                   (x_t, LAYOUT.TEACHER_MAX, LAYOUT.TEACHER_LOG_Z, LAYOUT.TEACHER_ENTROPY)):
        assert _rel(stats[:, top], x.max(1).values) < 1e-6
        assert _rel(stats[:, top] + stats[:, log_z], x.logsumexp(1)) < 1e-6
        log_p = x.log_softmax(1)
        assert _rel(stats[:, entropy], -(log_p.exp() * log_p).sum(1)) < 1e-5
    raw_lse = stats[:, LAYOUT.STUDENT_RAW_MAX].double() + stats[:, LAYOUT.STUDENT_RAW_LOG_Z].double()
    assert _rel(raw_lse, y_s.logsumexp(1)) < 1e-6
    per_row = reference.divergence_from_logits(y_s, reference.logits(h_t, weight, b_t), divergence="forward_kl",
                                               temperature=1.3)
    assert _rel(stats[:, LAYOUT.LOSS], per_row) < 1e-5
    assert torch.all(stats[:, LAYOUT.GRAD_SHIFT] == 0)


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_raw_lse_gradient_at_large_logits(seed, temperature):
    """The raw student lse's gradient (softmax of the untempered logits, from STUDENT_RAW_MAX and
    STUDENT_RAW_LOG_Z) with logits offset by ~1e4, where T m_s is not exact in fp32."""
    h_s, h_t, weight, b_s, b_t = _problem(10, 24, 211, bias=True)
    b_s = b_s + 9876.5
    problem = (h_s, h_t, weight, b_s, b_t)
    options = dict(temperature=temperature, student_scale=1.1)
    stats = _forward(problem, need_raw_lse=True, **options)
    coeff = torch.randn(10)
    grads = BACKWARD.divergence_backward(h_s, h_t, weight, None, b_s, b_t, stats, torch.zeros(10), coeff,
                                         need_grad_hidden=True, need_grad_weight=True, need_grad_bias=True,
                                         need_raw_lse=True, **options)
    def raw_lse_gradients(dtype, scale_first=False):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (h_s, weight, b_s)]
        if scale_first:  # the same logits, the other fp32 order: h W^T 1.1 + b 1.1
            logits = (leaves[0] @ leaves[1].T) * 1.1 + leaves[2] * 1.1
        else:
            logits = reference.logits(*leaves, logit_scale=1.1)
        raw = logits.logsumexp(-1)
        (coeff.to(dtype) * raw).sum().backward()
        return raw.detach(), [leaf.grad for leaf in leaves]

    raw, truth = raw_lse_gradients(torch.float64)
    lse = stats[:, LAYOUT.STUDENT_RAW_MAX].double() + stats[:, LAYOUT.STUDENT_RAW_LOG_Z].double()
    assert (lse - raw).abs().max() < 4e-3
    # the bar: plain fp32, whose error at logits ~1e4 (ulp 1e-3) depends on the order of its
    # roundings, so the worse of two equally plain orders (one alone is lucky now and then: the
    # kernel measured up to 2.4x a single order's error in 2 of 100 draws, <= 1.81x the worse of two)
    plain = [max(_rel(a, t), _rel(b, t)) for a, b, t in
             zip(raw_lse_gradients(torch.float32)[1], raw_lse_gradients(torch.float32, True)[1], truth)]
    for grad, expected, bar in zip(grads, truth, plain):
        assert _rel(grad, expected) <= 2 * bar + 1e-6


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_tile_configs_agree_with_float64(seed, divergence, beta):
    """Small tiles (several vocabulary tiles, K-loop steps, partial last tiles) and the
    launcher's big interpreter tiles give the same statistics and gradients, both near float64."""
    problem = _problem(21, 40, 301, bias=True)
    upstream = torch.randn(21)
    options = dict(divergence=divergence, beta=beta, temperature=0.7)
    truth, truth_grads = _float64_truth(problem, upstream, **options)
    small = dict(BT=16, BV=64, BK=16, num_warps=4, num_stages=1)
    for config in (None, small):
        forward_config = None if config is None else dict(config, tiles_per_split=5, splits=1)
        stats = _forward(problem, config=forward_config, **options)
        assert _rel(stats[:, LAYOUT.LOSS], truth) < 2e-5
        grads = _backward(problem, stats, upstream, config=config, **options)
        for grad, expected in zip(grads, truth_grads):
            assert grad.dtype == torch.float32 and _rel(grad, expected) < 2e-5


def test_unaligned_hidden_size_and_offset_views(seed):
    """D not a multiple of 16 and a weight whose base address is not 16-byte aligned (a view):
    the masked, non-vectorised load path."""
    h_s, h_t, weight, _, _ = _problem(7, 19, 150)
    storage = torch.empty(150 * 19 + 1)
    shifted = storage[1:].view(150, 19)
    shifted.copy_(weight)
    assert not FORWARD.aligned_for_vector_loads(shifted)
    problem = (h_s, h_t, shifted, None, None)
    truth, truth_grads = _float64_truth((h_s, h_t, weight, None, None), torch.ones(7))
    stats = _forward(problem)
    assert _rel(stats[:, LAYOUT.LOSS], truth) < 2e-5
    for grad, expected in zip(_backward(problem, stats, torch.ones(7)), truth_grads):
        assert _rel(grad, expected) < 2e-5


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_vocabulary_split_merge(seed, divergence, beta):
    """The GPU path splits V over programs and merges the partial sums (in float64); force it,
    with a split whose rows see only -inf logits (a banned-token bias) for some tiles."""
    problem = list(_problem(21, 40, 600, bias=True))
    problem[3][:260] = float("-inf")  # the first two BV-128 tiles, and part of the third
    options = dict(divergence=divergence, beta=beta, temperature=1.4, student_softcap=5.0, need_raw_lse=True)
    one = _forward(problem, **options)
    # 5 vocabulary tiles in 3 splits: the last split is short, the first is all -inf for the student
    config = dict(BT=32, BV=128, BK=64, num_warps=4, num_stages=1, tiles_per_split=2, splits=3)
    split = _forward(problem, **options, config=config)
    assert torch.isfinite(split).all()
    assert torch.allclose(split, one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 1.0), ("jsd", 0.4)])
def test_deterministic_backward_is_bitwise_repeatable(seed, divergence, beta):
    """deterministic=True: no atomics, the same bits on every run (split loops included), and the
    same gradients as the atomic kernel up to fp32 rounding."""
    problem = _problem(37, 24, 333, bias=True)
    upstream = torch.randn(37)
    options = dict(divergence=divergence, beta=beta, temperature=1.2, student_softcap=6.0)
    stats = _forward(problem, **options)
    config = dict(BT=16, BV=64, BK=16, num_warps=4, num_stages=1)
    atomic = _backward(problem, stats, upstream, config=config, **options)
    for splits in (None, (2, 2)):
        first = _backward(problem, stats, upstream, config=config, deterministic=True, splits=splits, **options)
        second = _backward(problem, stats, upstream, config=config, deterministic=True, splits=splits, **options)
        for a, b, reference_grad in zip(first, second, atomic):
            assert torch.equal(a, b)
            assert _rel(a, reference_grad) < 1e-5


def test_deterministic_single_gradients(seed):
    """Only dh, or only dW: the other kernel is not launched and its gradient is None."""
    problem = _problem(11, 16, 200)
    stats = _forward(problem)
    h_s, h_t, weight, _, _ = problem
    both = BACKWARD.divergence_backward(h_s, h_t, weight, None, None, None, stats, torch.ones(11), None,
                                        need_grad_hidden=True, need_grad_weight=True, need_grad_bias=False,
                                        deterministic=True)
    only_h = BACKWARD.divergence_backward(h_s, h_t, weight, None, None, None, stats, torch.ones(11), None,
                                          need_grad_hidden=True, need_grad_weight=False, need_grad_bias=False,
                                          deterministic=True)
    only_w = BACKWARD.divergence_backward(h_s, h_t, weight, None, None, None, stats, torch.ones(11), None,
                                          need_grad_hidden=False, need_grad_weight=True, need_grad_bias=False,
                                          deterministic=True)
    assert only_h[1] is None and only_w[0] is None and both[2] is None
    assert torch.equal(only_h[0], both[0]) and torch.equal(only_w[1], both[1])


@pytest.mark.parametrize("deterministic", [False, True])
def test_non_finite_rows_stay_in_their_row(seed, deterministic):
    """NaN and +inf hidden values propagate to their row only; a row whose student logits are
    all -inf is NaN by contract; -inf entries elsewhere give p = 0 and finite results."""
    problem = list(_problem(6, 16, 100, bias=True))
    problem[0][2, 3] = float("nan")
    problem[0][4, 5] = float("inf")
    problem[3][::3] = float("-inf")  # banned tokens: finite results in the other rows
    stats = _forward(problem)
    bad = torch.tensor([False, False, True, False, True, False])
    assert not torch.isfinite(stats[bad, LAYOUT.LOSS]).any()
    assert torch.isfinite(stats[~bad]).all()
    grad_hidden, _, _ = _backward(problem, stats, torch.ones(6), deterministic=deterministic)
    assert not torch.isfinite(grad_hidden[bad]).all(1).any()
    assert torch.isfinite(grad_hidden[~bad]).all()

    h_s, h_t, weight, _, _ = _problem(3, 8, 40)
    bias = torch.zeros(40)
    bias[:] = float("-inf")
    weight_rows = torch.zeros(40, 9)
    weight_rows[:, :8] = weight
    weight_rows[:, 8] = 1.0
    h_all_inf = torch.cat([h_s, torch.zeros(3, 1)], 1)  # the bias alone decides: every logit -inf
    stats = FORWARD.divergence_forward(h_all_inf, torch.cat([h_t, torch.zeros(3, 1)], 1), weight_rows, None,
                                       bias, None)
    assert torch.isnan(stats[:, LAYOUT.LOSS]).all()


def test_float64_is_refused_and_backend_reports(seed):
    h_s, h_t, weight, _, _ = (x.double() if x is not None else None for x in _problem(4, 8, 32))
    with pytest.raises(TypeError, match="float64"):
        crisp_fast.fused_linear_divergence(h_s, h_t, weight, backend="triton")
    available, why = triton_backend.is_available()
    assert available and "ok" in why
