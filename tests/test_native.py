"""Checks specific to the native C++ backend (csrc/, crisp_fast.backends.native).

    PYTHONPATH=. pytest -q tests/test_native.py

The numerics of every backend (every divergence, option, reduction, dtype) are the shared
conformance suite's (tests/test_backends.py). Here: the stats layout the extension was compiled
with and its build info, bitwise repeatability, the chunking, the bf16/fp16 mixed-GEMM path, a
float64 truth for the cases the split log-sum-exp exists for (logits ~1e4, T = 0.05, -inf bias
entries, a row of -inf), bad inputs, and the memory contract (no N x V tensor; scratch; peak RSS).
"""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import crisp_fast
from crisp_fast import reference
from crisp_fast.backends import native

AVAILABLE, WHY_NOT = native.is_available()
needs_native = pytest.mark.skipif(not AVAILABLE, reason=f"native backend not built: {WHY_NOT}")


def run(student_hidden, teacher_hidden, weight, teacher_weight=None, *, upstream=None, **kwargs):
    """(loss, grads of student_hidden / weight / student_bias) for the native backend (or `backend`)."""
    kwargs.setdefault("backend", "native")
    hs = student_hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    bias = kwargs.pop("student_bias", None)
    b = None if bias is None else bias.detach().clone().requires_grad_()
    fn = crisp_fast.fused_linear_divergence if kwargs["backend"] else reference.fused_linear_divergence
    if not kwargs["backend"]:
        kwargs.pop("backend")
    loss = fn(hs, teacher_hidden, w, teacher_weight, student_bias=b, **kwargs)
    total = loss if upstream is None else (loss * upstream.to(loss.dtype)).sum()
    grads = torch.autograd.grad(total, [t for t in (hs, w, b) if t is not None])
    return loss.detach(), grads


def truth(student_hidden, teacher_hidden, weight, teacher_weight=None, **kwargs):
    """The float64 reference of the same call."""
    to64 = lambda t: None if t is None else t.detach().double()  # noqa: E731
    for key in ("student_bias", "teacher_bias", "token_weights"):
        if kwargs.get(key) is not None:
            kwargs[key] = to64(kwargs[key])
    if kwargs.get("upstream") is not None:
        kwargs["upstream"] = kwargs["upstream"].double()
    return run(to64(student_hidden), to64(teacher_hidden), to64(weight), to64(teacher_weight), backend=None, **kwargs)


def assert_close(actual, expected, *, rtol, atol, what):
    actual, expected = actual.double(), expected.double()
    error = (actual - expected).abs().max().item()
    bound = atol + rtol * expected.abs().max().item()
    assert error <= bound, f"{what}: max error {error:.3e} > {bound:.3e}"


def make_inputs(n, d, vocab, *, d_t=None, separate_teacher=False, dtype=torch.float32, scale=1.0):
    hs = torch.randn(n, d) * scale
    ht = torch.randn(n, d_t or d) * scale
    w = torch.randn(vocab, d) / math.sqrt(d) * 3
    wt = torch.randn(vocab, d_t or d) / math.sqrt(d_t or d) * 3 if (separate_teacher or d_t) else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(hs), cast(ht), cast(w), cast(wt)


try:
    from crisp_fast.kernels import stats_layout as L
except ImportError:  # an uninstalled checkout
    from kernels import stats_layout as L


# ------------------------------------------------------------------------------------------------
# the compiled layout, build info, determinism
# ------------------------------------------------------------------------------------------------
@needs_native
def test_compiled_stats_layout_matches_python():
    compiled = dict(native._native().stats_layout())
    assert compiled == native._python_layout()
    assert compiled["NUM_STATS"] == L.NUM_STATS == 11 and compiled["TEACHER_ENTROPY"] == L.TEACHER_ENTROPY


def test_layout_mismatch_makes_backend_unavailable(monkeypatch):
    class Stale:  # a module compiled with the old 6-column layout
        __file__ = "stale.so"

        @staticmethod
        def stats_layout():
            return {"LOSS": 0, "STUDENT_LSE": 1, "NUM_STATS": 6}

    reason = native._layout_mismatch(Stale())
    assert reason and "stale.so" in reason and "NUM_STATS" in reason and "rebuild" in reason
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_why_not", None)
    monkeypatch.setattr(native.importlib, "import_module", lambda name: Stale())
    available, why = native.is_available()
    assert not available and "stats layout" in why


@needs_native
def test_build_info_says_what_was_built():
    info = native.build_info()
    for key in ("compiler", "flags", "march", "blas", "threads", "low_precision_gemm"):
        assert key in info, info
    assert "-O3" in info["flags"] and info["threads"] >= 1
    assert "bf16" in info["low_precision_gemm"] and "fp16" in info["low_precision_gemm"]


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_repeatable(seed, dtype):
    """Run to run, with deterministic True or False: the same bits (fixed chunks, fixed reduction
    order, rows handed out dynamically but each computed alone)."""
    hs, ht, w, _ = make_inputs(70, 24, 9001, dtype=dtype)
    grad_loss = torch.rand(70)

    def once(deterministic):
        stats, grads = native.forward_backward(hs, ht, w, None, None, None, grad_loss, None, need_grad_hidden=True,
                                               need_grad_weight=True, need_grad_bias=False, temperature=0.7,
                                               deterministic=deterministic)
        stats_f = native.forward(hs, ht, w, None, None, None, temperature=0.7, deterministic=deterministic)
        grads_b = native.backward(hs, ht, w, None, None, None, stats_f, grad_loss, None, need_grad_hidden=True,
                                  need_grad_weight=True, need_grad_bias=False, temperature=0.7,
                                  deterministic=deterministic)
        return [stats, grads[0], grads[1], stats_f, grads_b[0], grads_b[1]]

    first = once(True)
    for again in (once(True), once(False)):
        for a, b in zip(first, again):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# float64 truth for the cases the split log-sum-exp exists for (backend level, new layout)
# ------------------------------------------------------------------------------------------------
def _rows_truth(hs, ht, w, bias, teacher_bias, grad_loss, *, divergence, beta, temperature, softcap=None,
                raw_coeff=None, exact_epilogue=False):
    """(divergence, lse_s, lse_t, H_s, H_t, raw lse, dh, dW) in the dtype of the inputs, with the
    masked forms (p log p = 0 where p = 0) that make -inf logits exact."""
    hs = hs.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    ys = hs @ w.T + (0 if bias is None else bias.to(hs.dtype))
    if softcap is not None:
        ys = softcap * torch.tanh(ys / softcap)
    yt = ht @ w.detach().T + (0 if teacher_bias is None else teacher_bias.to(ht.dtype))
    if exact_epilogue:  # logits rounded by the fp32 GEMM, everything after them in float64
        ys, yt = ys.double(), yt.double()
    xs, xt = ys / temperature, yt / temperature
    log_p, log_q = torch.log_softmax(xs, -1), torch.log_softmax(xt, -1)

    def kl(log_a, log_b):
        # safe values where a = 0, so that neither the forward nor autograd forms 0 * -inf
        mask = log_a > -math.inf
        log_a, log_b = torch.where(mask, log_a, 0.0), torch.where(mask, log_b, 0.0)
        return torch.where(mask, log_a.exp() * (log_a - log_b), 0.0).sum(-1)

    def entropy(log_a):
        mask = log_a > -math.inf
        log_a = torch.where(mask, log_a, 0.0)
        return -torch.where(mask, log_a.exp() * log_a, 0.0).sum(-1)

    if divergence == "reverse_kl":
        div = kl(log_p, log_q)
    elif divergence == "forward_kl":
        div = kl(log_q, log_p)
    else:
        log_m = torch.logaddexp(log_p + math.log(1 - beta), log_q + math.log(beta))
        div = beta * kl(log_q, log_m) + (1 - beta) * kl(log_p, log_m)
    raw = torch.logsumexp(ys, -1)
    total = (div * grad_loss.to(div.dtype)).sum()
    if raw_coeff is not None:
        total = total + (raw * raw_coeff.to(raw.dtype)).sum()
    dh, dw = torch.autograd.grad(total, [hs, w])
    out = (div, torch.logsumexp(xs, -1), torch.logsumexp(xt, -1), entropy(log_p), entropy(log_q), raw, dh, dw)
    return [t.detach() for t in out]


def _rows_native(hs, ht, w, bias, teacher_bias, grad_loss, *, fused, softcap=None, raw_coeff=None, **options):
    kwargs = dict(options, student_softcap=softcap, need_raw_lse=raw_coeff is not None)
    if fused:
        stats, (dh, dw, _) = native.forward_backward(hs, ht, w, None, bias, teacher_bias, grad_loss, raw_coeff,
                                                     need_grad_hidden=True, need_grad_weight=True,
                                                     need_grad_bias=False, **kwargs)
    else:
        stats = native.forward(hs, ht, w, None, bias, teacher_bias, **kwargs)
        dh, dw, _ = native.backward(hs, ht, w, None, bias, teacher_bias, stats, grad_loss, raw_coeff,
                                    need_grad_hidden=True,
                                    need_grad_weight=True, need_grad_bias=False, **kwargs)
    s = stats.double()
    raw = s[:, L.STUDENT_RAW_MAX] + s[:, L.STUDENT_RAW_LOG_Z]
    return [s[:, L.LOSS], s[:, L.STUDENT_MAX] + s[:, L.STUDENT_LOG_Z], s[:, L.TEACHER_MAX] + s[:, L.TEACHER_LOG_Z],
            s[:, L.STUDENT_ENTROPY], s[:, L.TEACHER_ENTROPY], raw, dh, dw]


def _large_logits(n, d, vocab):
    """Logits ~ +-1e4, exact fp32 integers (W has a large mean column), teacher close: KL ~ 1."""
    hs = torch.randint(-3, 4, (n, d)).float()
    w = torch.randint(-1, 2, (vocab, d)).float()
    hs[:, 0] = 100.0
    w[:, 0] = 100.0 if torch.rand(()) < 0.5 else -100.0
    ht = hs.clone()
    ht[:, 1:] += torch.randint(-1, 2, (n, d - 1)).float()
    return hs, ht, w


NEW_CASES = {
    "logits ~ 1e4": dict(),
    "temperature 0.05": dict(temperature=0.05),
    "-inf student bias": dict(bias="-inf"),
    "-inf both biases, forward kl": dict(bias="-inf", teacher_bias=True, divergence="forward_kl"),
    "-inf bias, jsd": dict(bias="-inf", divergence="jsd", beta=0.3),
    "raw lse, softcap, T = 1.5": dict(temperature=1.5, softcap=6.0, raw=True),
}


@needs_native
@pytest.mark.parametrize("case", list(NEW_CASES))
def test_new_cases_no_worse_than_plain_fp32(seed, case):
    """Every statistic and both gradients within 2x the error of the plain materialised fp32
    computation (plus a floor of a few fp32 ulps), forward_backward and forward + backward.
    (Before the split log-sum-exp, the 1e4 case's dh was ~1e3x the plain error.)"""
    spec = NEW_CASES[case]
    n, d, vocab = 29, 40, 9001  # two vocabulary blocks, the last one ragged
    if case == "logits ~ 1e4":
        hs, ht, w = _large_logits(n, d, vocab)
    else:
        hs, ht, w, _ = make_inputs(n, d, vocab)
    bias = teacher_bias = None
    if spec.get("bias") == "-inf":
        bias = torch.randn(vocab)
        bias[torch.randperm(vocab)[: vocab // 4]] = -math.inf
        bias[:64] = -math.inf  # a run of banned tokens, so a SIMD span starts with them
        if spec.get("teacher_bias"):  # the same banned tokens (forward KL is infinite otherwise)
            teacher_bias = torch.where(torch.isfinite(bias), torch.randn(vocab), bias)
    options = dict(divergence=spec.get("divergence", "reverse_kl"), beta=spec.get("beta", 1.0),
                   temperature=spec.get("temperature", 1.0))
    grad_loss = torch.rand(n) + 0.5
    raw_coeff = torch.randn(n) if spec.get("raw") else None
    extra = dict(softcap=spec.get("softcap"), raw_coeff=raw_coeff)
    to64 = lambda t: None if t is None else t.double()  # noqa: E731
    truth = _rows_truth(*map(to64, (hs, ht, w, bias, teacher_bias, grad_loss)), **options,
                        **dict(extra, raw_coeff=to64(raw_coeff)))
    plain = _rows_truth(hs, ht, w, bias, teacher_bias, grad_loss, **options, **extra)
    # what the fp32 GEMM's rounding of the logits alone costs: no fp32 backend can beat it, and on
    # one random draw the plain computation can be luckier than that (seen at T = 0.05)
    gemm_only = _rows_truth(hs, ht, w, bias, teacher_bias, grad_loss, **options, **extra, exact_epilogue=True)
    names = ("loss", "student lse", "teacher lse", "student entropy", "teacher entropy", "raw lse", "dh", "dW")
    for fused in (True, False):
        got = _rows_native(hs, ht, w, bias, teacher_bias, grad_loss, fused=fused, **options, **extra)
        for name, mine, base, floor, want in zip(names, got, plain, gemm_only, truth):
            if name == "raw lse" and raw_coeff is None:
                continue
            assert torch.isfinite(mine).all(), f"{case}: {name} is not finite"
            scale = want.abs().max().item()
            error = (mine.double() - want).abs().max().item()
            # the floor: ~16 fp32 ulps of the largest entry (a max-abs over one random draw is noisy)
            baseline = max((base.double() - want).abs().max().item(), (floor.double() - want).abs().max().item())
            # gradients: + the stored fp32 log Z's half ulp (~5e-7 at log Z ~ 9), which the
            # layout prescribes and which scales every p of the row alike
            bound = 2 * baseline + (1e-6 if name not in ("dh", "dW") else 4e-6) * scale
            assert error <= bound, f"{case} ({'fused' if fused else 'fwd+bwd'}): {name} error {error:.3e} > {bound:.3e}"


@needs_native
def test_nonfinite_rows():
    """A row with NaN or +inf logits, or a side that is -inf everywhere, is NaN; the other rows are
    untouched and finite."""
    hs, ht, w, _ = make_inputs(6, 8, 300)
    hs[2, 3] = float("nan")
    ht[4, 0] = float("inf")
    bias = torch.zeros(300)
    stats = native.forward(hs, ht, w, None, bias, None)
    bad = torch.tensor([False, False, True, False, True, False])
    assert torch.isnan(stats[bad, : L.STUDENT_RAW_MAX]).all()
    assert torch.isfinite(stats[~bad]).all()
    everywhere = torch.full((300,), -math.inf)
    stats = native.forward(hs[:2], ht[:2], w, None, everywhere, None)
    assert torch.isnan(stats[:, L.LOSS]).all() and torch.isnan(stats[:, L.STUDENT_MAX]).all()


# ------------------------------------------------------------------------------------------------
# bf16 / fp16: the mixed-GEMM path (bf16 operands, fp32 accumulators)
# ------------------------------------------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_mixed_gemm_path_matches_fp32_path(seed, dtype, monkeypatch):
    """CRISP_FAST_NATIVE_GEMM=input forces MKL's bf16 GEMMs even where the CPU would emulate them:
    statistics as exact as the fp32-converted path (same products, fp32 sums), dh from the
    gradient tile split in two bf16 tiles (16 bits), dW from the tile rounded to bf16."""
    if "no MKL mixed GEMM" in native.build_info()["low_precision_gemm"]:
        pytest.skip("this torch's BLAS has no mixed-precision GEMM")
    hs, ht, w, _ = make_inputs(45, 32, 8300, dtype=dtype)
    grad_loss = torch.rand(45) + 0.5

    def run_path(path):
        monkeypatch.setenv("CRISP_FAST_NATIVE_GEMM", path)
        assert path in native.build_info()["low_precision_gemm"]
        return native.forward_backward(hs, ht, w, None, None, None, grad_loss, None, need_grad_hidden=True,
                                       need_grad_weight=True, need_grad_bias=False, temperature=0.9)

    stats32, (dh32, dw32, _) = run_path("fp32")
    stats16, (dh16, dw16, _) = run_path("input")
    assert_close(stats16, stats32, rtol=1e-5, atol=1e-5, what="stats")
    assert_close(dh16, dh32, rtol=2e-4, atol=0, what="dh")  # hi + lo: ~2^-17 of each term
    assert_close(dw16, dw32, rtol=8e-3, atol=0, what="dW")  # hi: ~2^-9 of each term
    with pytest.raises(RuntimeError, match="CRISP_FAST_NATIVE_GEMM"):
        monkeypatch.setenv("CRISP_FAST_NATIVE_GEMM", "fast")
        native.forward(hs, ht, w, None, None, None)


@needs_native
def test_many_chunks_match_one_chunk(seed, monkeypatch):
    """Forcing 7-row chunks (the plan normally picks larger) changes nothing but rounding."""
    inputs = make_inputs(50, 32, 999)
    loss, grads = run(*inputs, reduction="mean", temperature=1.2)
    monkeypatch.setenv("CRISP_FAST_NATIVE_CHUNK_ROWS", "7")
    assert native.plan(50, 999, 32)["chunk_rows"] == 7
    loss_chunked, grads_chunked = run(*inputs, reduction="mean", temperature=1.2)
    assert_close(loss_chunked, loss, rtol=1e-6, atol=1e-7, what="loss")
    for got, want in zip(grads_chunked, grads):
        assert_close(got, want, rtol=1e-5, atol=1e-8, what="grad")


@needs_native
def test_bad_inputs_raise_clear_errors(seed):
    hs, ht, w, _ = make_inputs(4, 8, 50)
    with pytest.raises(ValueError, match="cpu|CPU"):
        native.forward(hs.to("meta"), ht, w, None, None, None)
    with pytest.raises(TypeError, match="float64"):
        crisp_fast.fused_linear_divergence(hs.double(), ht.double(), w.double(), backend="native")
    with pytest.raises(RuntimeError, match="divergence"):
        native.forward(hs, ht, w, None, None, None, divergence="kl")
    with pytest.raises(RuntimeError, match="grad_loss"):
        native.forward_backward(hs, ht, w, None, None, None, torch.ones(3), None, need_grad_hidden=True,
                                need_grad_weight=True, need_grad_bias=False)
    with pytest.raises(RuntimeError, match="stats"):
        native.backward(hs, ht, w, None, None, None, torch.zeros(4, 5), torch.ones(4), None, need_grad_hidden=True,
                        need_grad_weight=False, need_grad_bias=False)
    with pytest.raises(RuntimeError, match="hidden sizes"):
        native.forward(hs, ht[:, :5], w, None, None, None)


def test_unavailable_backend_raises_with_the_reason(monkeypatch):
    monkeypatch.setattr(native, "is_available", lambda: (False, "no compiler at build time"))
    hs, ht, w, _ = make_inputs(2, 4, 10)
    with pytest.raises(RuntimeError, match="no compiler at build time"):
        crisp_fast.fused_linear_divergence(hs, ht, w, backend="native")


# ------------------------------------------------------------------------------------------------
# memory contract
# ------------------------------------------------------------------------------------------------
class _RecordAllocations(TorchDispatchMode):
    """The largest tensor any op creates (outputs that alias an input, as out= GEMMs into the
    backend's own scratch do, are not new allocations)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        storages = {t.untyped_storage().data_ptr() for t in inputs}
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in storages:
                self.largest = max(self.largest, tensor.numel())
        return out


@needs_native
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_tensor_of_tokens_by_vocab(seed, reduction):
    n, d, vocab = 96, 8, 4099  # N > 4 D, so dW [V, D] itself is under the N V / 4 bar
    hs, ht, w, _ = make_inputs(n, d, vocab)
    h, weight = hs.requires_grad_(), w.requires_grad_()
    with _RecordAllocations() as recorder:
        loss = crisp_fast.fused_linear_divergence(h, ht, weight, backend="native", reduction=reduction)
        (loss.sum() if reduction == "none" else loss).backward()
    assert recorder.largest < n * vocab / 4, f"a tensor of {recorder.largest} elements (N*V = {n * vocab})"


@needs_native
@pytest.mark.parametrize("n,d", [(1, 256), (2048, 256), (16384, 256), (2048, 1024), (16384, 1024), (64, 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plan_scratch_within_half_the_gradients(n, d, dtype):
    """The C++ scratch (invisible to dispatch modes) stays under half the irreducible gradients,
    so outputs + scratch <= 1.5x, at every N, and chunks are as large as that allows."""
    vocab = 151936
    gradients = 4 * (vocab * d + n * d)
    for full_rows in (True, False):
        plan = native.plan(n, vocab, d, dtype=dtype, full_rows=full_rows)
        assert plan["workspace_bytes"] <= 0.5 * gradients, plan
        assert 1 <= plan["chunk_rows"] <= n
    plan = native.plan(n, vocab, d, dtype=dtype, full_rows=True)
    # 2 fp32 logits rows of V per token in 0.4x the gradients: about D / 5 rows (less for bf16,
    # whose fp32 copy of a weight block comes out of the same budget)
    assert plan["chunk_rows"] >= min(n, d // 6 if dtype == torch.float32 else d // 8), plan
    # forward_backward streams when that is under 192 rows: its chunks are then far larger
    chosen = native.plan(n, vocab, d, dtype=dtype)
    assert chosen["full_rows"] == (plan["chunk_rows"] >= min(n, 192)), (plan, chosen)
    assert chosen["chunk_rows"] >= plan["chunk_rows"], (plan, chosen)


@needs_native
@pytest.mark.parametrize("workspace,full_rows", [(0, False), (3 << 20, True), (None, False)])
def test_workspace_budget_bounds_scratch_and_keeps_results(seed, workspace, full_rows):
    """workspace_bytes: the scratch stays within the budget (one row at the least), forward_backward
    streams when the budget holds too few full rows (0, and the default at this small D) and keeps
    full rows when it holds them all (3 MiB), and
    every budget gives the float64 answer to the same accuracy, on both CPU backends."""
    n, d, vocab = 37, 24, 5003
    inputs = make_inputs(n, d, vocab, separate_teacher=True)
    want_loss, want_grads = truth(*inputs, reduction="sum", temperature=0.8)
    plan = native.plan(n, vocab, d, workspace_bytes=workspace)
    assert plan["full_rows"] == full_rows, plan
    if workspace is not None:
        smallest = native.plan(n, vocab, d, full_rows=False, workspace_bytes=0)["workspace_bytes"]
        assert plan["workspace_bytes"] <= max(workspace, smallest), plan
    for backend in ("native", "torch"):
        loss, grads = run(*inputs, reduction="sum", temperature=0.8, workspace_bytes=workspace, backend=backend)
        assert_close(loss, want_loss, rtol=1e-5, atol=1e-6, what=f"{backend} loss")
        for got, want in zip(grads, want_grads):
            assert_close(got, want, rtol=1e-5, atol=1e-7, what=f"{backend} grad")
    with pytest.raises(ValueError, match="workspace_bytes must be None or >= 0"):
        native.plan(n, vocab, d, workspace_bytes=-1)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="workspace_bytes must be None or an int >= 0"):
            crisp_fast.fused_linear_reverse_kl(*inputs[:3], workspace_bytes=bad)


_PEAK_SCRIPT = textwrap.dedent("""
    import torch, crisp_fast
    from crisp_fast.backends import native
    torch.manual_seed(0)
    n, d, vocab = 1024, 256, 65536
    def public(h, ht, w):
        crisp_fast.fused_linear_divergence(h, ht, w, backend="native").backward()
    def backend(h, ht, w):
        return native.forward_backward(h, ht, w, None, None, None, torch.full((h.shape[0],), 1.0 / h.shape[0]),
                                       None, need_grad_hidden=True, need_grad_weight=True, need_grad_bias=False)
    warm = torch.randn(8, d, requires_grad=True)
    public(warm, torch.randn(8, d), torch.randn(64, d, requires_grad=True))
    h = torch.randn(n, d, requires_grad=True); ht = torch.randn(n, d)
    w = (torch.randn(vocab, d) / 16).requires_grad_()
    def kib(field):
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))
    gradients = 4 * (vocab * d + n * d)
    for step in (backend, public):
        h.grad = w.grad = None
        base = kib("VmRSS")
        open("/proc/self/clear_refs", "w").write("5")
        result = step(h, ht, w)
        print(step.__name__, (kib("VmHWM") - base) * 1024 / gradients)
        del result
""")


@needs_native
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_peak_rss_over_inputs(seed):
    """Measured peak RSS of forward+backward over the inputs, in units of the irreducible
    gradients (dW + dh); the full logits would be 4x them here (N x V x 4 B x 2 sides)."""
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    ratios = dict(line.split() for line in out.stdout.strip().splitlines())
    print(ratios)
    assert float(ratios["backend"]) <= 1.5, f"backend peak RSS over inputs: {ratios['backend']}x the gradients"
    # through autograd too: loss.py scales the precomputed gradients in place and hands them over
    assert float(ratios["public"]) <= 1.5, f"public API peak RSS over inputs: {ratios['public']}x the gradients"
