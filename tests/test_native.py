"""The native C++ backend (csrc/, crisp_fast.backends.native) against the float64 reference,
through the public API `crisp_fast.fused_linear_divergence(..., backend="native")`.

    PYTHONPATH=. pytest -q tests/test_native.py        (about a minute on 2 busy cores)

Covers every divergence and option, awkward shapes (V = 151,936 with few rows), reduction="none"
with a random upstream gradient, bf16/fp16 bounded by an fp32-upcast PyTorch computation, bad
inputs, and the memory contract (no N x V tensor; the C++ scratch and the peak RSS).
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


def check_against_truth(inputs, *, rtol=2e-5, atol=2e-6, upstream=None, **kwargs):
    """Native vs the fp64 truth: within `rtol`/`atol`, or (for ill-conditioned cases such as sharp
    temperatures) no worse than twice the error of the same computation in plain fp32 PyTorch."""
    loss, grads = run(*inputs, upstream=upstream, **kwargs)
    ref_loss, ref_grads = truth(*inputs, upstream=upstream, **kwargs)
    loss32, grads32 = run(*inputs, upstream=upstream, backend=None, **kwargs)
    names = ("loss", "grad student_hidden", "grad weight", "grad bias")
    for name, got, fp32, want, tol in zip(names, (loss, *grads), (loss32, *grads32), (ref_loss, *ref_grads),
                                          (rtol, *[5 * rtol] * 3)):
        error = (got.double() - want).abs().max().item()
        fp32_error = (fp32.double() - want).abs().max().item()
        bound = max(atol + tol * want.abs().max().item(), 2 * fp32_error)
        assert error <= bound, f"{name}: max error {error:.3e} > {bound:.3e} (fp32 PyTorch: {fp32_error:.3e})"


OPTION_SETS = [
    {},
    {"temperature": 1.7},
    {"temperature": 0.6, "student_logit_scale": 0.7, "teacher_logit_scale": 1.3},
    {"student_softcap": 4.0, "teacher_softcap": 6.0, "temperature": 1.3},
    {"student_bias": "random", "teacher_bias": "random"},
]


@needs_native
@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 1.0), ("forward_kl", 0.0), ("jsd", 0.35)])
@pytest.mark.parametrize("options", range(len(OPTION_SETS)))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_float64_reference(seed, divergence, beta, options, reduction):
    vocab = 8195 + 17 * options  # just over one 8192-column block: a 3- to 71-column ragged tail
    inputs = make_inputs(23, 40, vocab, separate_teacher=options % 2 == 1)
    kwargs = dict(OPTION_SETS[options])
    for key in ("student_bias", "teacher_bias"):
        if kwargs.get(key) == "random":
            kwargs[key] = torch.randn(vocab)
    upstream = torch.randn(23) if reduction == "none" else None
    check_against_truth(inputs, divergence=divergence, beta=beta, reduction=reduction, upstream=upstream, **kwargs)


@needs_native
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_separate_teacher_with_other_hidden_size_and_weights_and_mask(seed, divergence):
    inputs = make_inputs(31, 24, 777, d_t=56)
    mask = torch.rand(31) > 0.3
    check_against_truth(inputs, divergence=divergence, beta=0.6, mask=mask, token_weights=torch.rand(31),
                        reduction="sum", temperature=1.4)


@needs_native
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_full_vocabulary_few_rows(seed, reduction):
    """V = 151,936 (Qwen) with N = 5, D = 16: many blocks, a ragged last one, rows < chunk."""
    inputs = make_inputs(5, 16, 151936)
    upstream = torch.randn(5) if reduction == "none" else None
    check_against_truth(inputs, reduction=reduction, upstream=upstream, rtol=5e-5, atol=5e-6)


@needs_native
@pytest.mark.parametrize("n,d,vocab", [(1, 1, 1), (1, 7, 2), (3, 5, 4097), (129, 8, 301)])
def test_awkward_shapes(seed, n, d, vocab):
    check_against_truth(make_inputs(n, d, vocab), reduction="mean", divergence="jsd", beta=0.5)


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
def test_raw_lse_statistics_and_gradient(seed):
    """need_raw_lse / grad_raw_lse (the hard-CE term's lse of untempered capped logits)."""
    hs, ht, w, _ = make_inputs(19, 24, 1500)
    raw_coeff = torch.randn(19)
    kwargs = dict(temperature=1.5, student_softcap=5.0, reduction="sum")
    h = hs.clone().requires_grad_()
    loss, stats = crisp_fast.fused_linear_divergence(h, ht, w, backend="native", return_stats=True,
                                                     _raw_lse_coeff=raw_coeff, **kwargs)
    (grad,) = torch.autograd.grad(loss, h)
    h64 = hs.double().requires_grad_()
    ref = reference.fused_linear_divergence(h64, ht.double(), w.double(), **kwargs)
    raw = reference.token_statistics(h64, ht.double(), w.double(), **{k: v for k, v in kwargs.items() if k != "reduction"})
    ref_total = ref + (raw_coeff.double() * raw["student_raw_lse"]).sum()
    (ref_grad,) = torch.autograd.grad(ref_total, h64)
    assert_close(loss, ref_total, rtol=2e-5, atol=2e-5, what="loss with raw lse")
    assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6, what="grad with raw lse")
    assert_close(stats.student_entropy, raw["student_entropy"], rtol=2e-5, atol=2e-5, what="entropy")
    assert_close(stats.teacher_lse, raw["teacher_lse"], rtol=1e-6, atol=1e-5, what="teacher lse")


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 1.0), ("jsd", 0.4)])
def test_low_precision_no_worse_than_fp32_upcast_pytorch(seed, dtype, divergence, beta):
    """CCE's test method: error vs the fp64 truth (on the same rounded inputs) is bounded by the
    error of a plain fp32-upcast PyTorch computation."""
    inputs = make_inputs(33, 64, 3001, dtype=dtype)
    kwargs = dict(divergence=divergence, beta=beta, temperature=1.1, reduction="mean")
    loss, grads = run(*inputs, **kwargs)
    assert loss.dtype == torch.float32 and grads[0].dtype == dtype and grads[1].dtype == dtype
    upcast = [None if t is None else t.float() for t in inputs]
    loss32, grads32 = run(*upcast, backend=None, **kwargs)
    ref_loss, ref_grads = truth(*inputs, **kwargs)
    slack = 2e-6  # a few fp32 ulps of the value itself: the fp32 baseline can round luckily
    assert (loss.double() - ref_loss).abs() <= 2 * (loss32.double() - ref_loss).abs() + slack * max(1.0, ref_loss.abs())
    for got, ours32, want in zip(grads, grads32, ref_grads):
        # both sides round the gradient to the input dtype: compare the rounded fp32 result too
        baseline = (ours32.to(dtype).double() - want).abs().max()
        assert (got.double() - want).abs().max() <= 2 * baseline + slack * want.abs().max()


@needs_native
def test_nonfinite_inputs_propagate(seed):
    hs, ht, w, _ = make_inputs(6, 8, 300)
    hs[2, 3] = float("nan")
    per_row = crisp_fast.fused_linear_divergence(hs, ht, w, backend="native", reduction="none")
    assert torch.isnan(per_row[2]) and torch.isfinite(per_row[torch.arange(6) != 2]).all()
    ht[4, 0] = float("inf")
    assert torch.isnan(crisp_fast.fused_linear_divergence(hs, ht, w, backend="native")).item()


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
    plan = native.plan(n, vocab, d, dtype=dtype)
    # 2 fp32 logits rows of V per token in 0.4x the gradients: about D / 5 rows (less for bf16,
    # whose fp32 copy of a weight block comes out of the same budget)
    assert plan["chunk_rows"] >= min(n, d // 6 if dtype == torch.float32 else d // 8), plan


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
