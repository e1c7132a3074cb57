"""The math contract of crisp_fast.loss, exercised through the torch backend (which runs anywhere).

Truth is crisp_fast.reference in float64 on the same inputs. For low-precision inputs the bound
is the Cut Cross-Entropy method: our error against the truth may not exceed (a small multiple of)
the error of a plain fp32-upcast PyTorch implementation on the same inputs.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from crisp_fast import TokenStats, fused_linear_divergence, fused_linear_reverse_kl
from crisp_fast import reference

BACKEND = "torch"


def make_inputs(n, d, vocab, *, d_teacher=None, dtype=torch.float32, shared=True, bias=False, spread=1.0):
    """Random hidden states and heads; `spread` scales the logits."""
    h_s = torch.randn(n, d) * spread
    w = torch.randn(vocab, d) / d**0.5
    if shared:
        h_t, w_t = h_s + 0.5 * torch.randn(n, d) * spread, None
    else:
        d_teacher = d_teacher or d
        h_t, w_t = torch.randn(n, d_teacher) * spread, torch.randn(vocab, d_teacher) / d_teacher**0.5
    b = torch.randn(vocab) if bias else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(h_s), cast(h_t), cast(w), cast(w_t), cast(b)


def run(loss_fn, h_s, h_t, w, w_t, b, *, upstream=None, **kwargs):
    """Loss and grads of (h_s, w, b) for a fresh leaf copy of the inputs."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in (h_s, w, b)]
    out = loss_fn(leaves[0], h_t, leaves[1], w_t, student_bias=leaves[2], **kwargs)
    (out * (1.0 if upstream is None else upstream.to(out.dtype))).sum().backward()
    return [out.detach()] + [None if t is None else t.grad for t in leaves]


def truth(h_s, h_t, w, w_t, b, **kwargs):
    up = kwargs.pop("upstream", None)
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    return run(reference.fused_linear_divergence, f64(h_s), f64(h_t), f64(w), f64(w_t), f64(b),
               upstream=None if up is None else up.double(), **kwargs)


def max_rel_error(ours, exact):
    # the floor keeps denormal-sized gradients (both distributions one-hot) from counting as errors
    return max(((a.double() - e).abs().max() / e.abs().max().clamp_min(1e-6)).item()
               for a, e in zip(ours, exact) if e is not None)


def plain_pytorch(h_s, h_t, w, w_t, student_bias=None, **kwargs):
    """The fp32-upcast materialised implementation: the yardstick for rounding error."""
    up = lambda t: None if t is None else t.float()  # noqa: E731
    return reference.fused_linear_divergence(h_s.float(), h_t.float(), w.float(), up(w_t),
                                             student_bias=student_bias, **kwargs)


def assert_close_to_truth(inputs, tolerance=5e-5, **kwargs):
    """Our error against the fp64 truth is below `tolerance`, or (when fp32 rounding alone is larger
    on these inputs) below twice the error of the plain fp32 implementation."""
    exact = truth(*inputs, **kwargs)
    ours = run(fused_linear_divergence, *inputs, backend=BACKEND, **kwargs)
    error = max_rel_error(ours, exact)
    if inputs[0].dtype != torch.float64 and error >= tolerance:
        tolerance = 2 * max_rel_error(run(plain_pytorch, *inputs, **kwargs), exact)
    assert error < tolerance, f"max relative error {error:.2e} >= {tolerance:.1e}"
    return error


CASES = [
    dict(divergence="reverse_kl"),
    dict(divergence="forward_kl"),
    dict(divergence="jsd", beta=0.5),
    dict(divergence="jsd", beta=0.1, temperature=0.7),
    dict(divergence="reverse_kl", temperature=2.5, student_logit_scale=0.8, teacher_logit_scale=1.3),
    dict(divergence="reverse_kl", student_softcap=3.0, teacher_softcap=4.0),
    dict(divergence="forward_kl", student_softcap=2.0, temperature=1.5),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared-head", "own-teacher-head"])
def test_fp32_and_fp64_match_float64_truth(seed, case, reduction, shared):
    inputs = make_inputs(37, 19, 1031, d_teacher=26, shared=shared, bias=True, spread=2.0)
    mask = torch.rand(37) > 0.3
    upstream = torch.randn(37) if reduction == "none" else None
    assert_close_to_truth(inputs, reduction=reduction, mask=mask, upstream=upstream, **case)
    f64 = [None if t is None else t.double() for t in inputs]
    assert_close_to_truth(f64, tolerance=1e-12, reduction=reduction, mask=mask, upstream=upstream, **case)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_low_precision_no_worse_than_fp32_upcast_pytorch(seed, dtype, divergence):
    inputs = make_inputs(33, 48, 2053, dtype=dtype, spread=3.0)
    kwargs = dict(divergence=divergence, beta=0.5, mask=torch.rand(33) > 0.2)
    exact = truth(*inputs, **kwargs)
    ours = run(fused_linear_divergence, *inputs, backend=BACKEND, **kwargs)

    baseline = run(plain_pytorch, *inputs, **kwargs)
    ours_error, baseline_error = max_rel_error(ours, exact), max_rel_error(baseline, exact)
    assert ours_error <= 2 * baseline_error + 1e-6, (ours_error, baseline_error)
    assert ours[1].dtype == dtype and ours[2].dtype == dtype


def test_real_vocabulary_odd_shapes(seed):
    inputs = make_inputs(5, 7, 151_936, shared=False, d_teacher=9, bias=True)
    assert_close_to_truth(inputs, reduction="mean", temperature=1.3)


def test_batched_input_with_2d_mask_equals_flattened(seed):
    h_s, h_t, w, _, _ = make_inputs(2 * 9, 16, 301)
    mask = torch.rand(2, 9) > 0.4
    flat = fused_linear_reverse_kl(h_s, h_t, w, mask=mask.reshape(-1), backend=BACKEND)
    batched = fused_linear_reverse_kl(h_s.reshape(2, 9, 16), h_t.reshape(2, 9, 16), w, mask=mask, backend=BACKEND)
    torch.testing.assert_close(batched, flat)
    per_token = fused_linear_reverse_kl(h_s.reshape(2, 9, 16), h_t.reshape(2, 9, 16), w, mask=mask,
                                        reduction="none", backend=BACKEND)
    assert per_token.shape == (18,) and (per_token[~mask.reshape(-1)] == 0).all()


def test_token_weights_are_the_normaliser(seed):
    inputs = make_inputs(21, 12, 257)
    weights = torch.rand(21)
    mask = torch.rand(21) > 0.3
    assert_close_to_truth(inputs, token_weights=weights, mask=mask, reduction="mean")
    per_token = fused_linear_reverse_kl(*inputs[:3], reduction="none", mask=mask, backend=BACKEND)
    weighted = fused_linear_reverse_kl(*inputs[:3], token_weights=weights, mask=mask, backend=BACKEND)
    torch.testing.assert_close(weighted, (per_token * weights).sum())


def test_raw_lse_term_matches_cross_entropy_reference(seed):
    h_s, h_t, w, _, b = make_inputs(17, 10, 211, bias=True)
    coeff = torch.rand(17)

    def with_raw_lse(h, ht, weight, wt, student_bias=None, **kw):
        if h.dtype == torch.float64:  # the reference: materialised logits
            y = reference.logits(h, weight, student_bias, logit_scale=0.7, softcap=5.0)
            soft = reference.fused_linear_divergence(h, ht, weight, student_bias=student_bias, reduction="sum",
                                                     token_weights=coeff.double(), temperature=2.0,
                                                     student_logit_scale=0.7, student_softcap=5.0)
            return soft + (coeff.double() * torch.logsumexp(y, dim=-1)).sum()
        return fused_linear_divergence(h, ht, weight, student_bias=student_bias, token_weights=coeff, temperature=2.0,
                                       student_logit_scale=0.7, student_softcap=5.0, backend=BACKEND,
                                       _raw_lse_coeff=coeff)

    f64 = lambda t: t.double()  # noqa: E731
    exact = run(with_raw_lse, f64(h_s), f64(h_t), f64(w), None, f64(b))
    ours = run(with_raw_lse, h_s, h_t, w, None, b)
    assert max_rel_error(ours, exact) < 2e-5


def test_token_stats_match_reference(seed):
    h_s, h_t, w, w_t, b = make_inputs(23, 11, 307, shared=False, d_teacher=6, bias=True)
    mask = torch.rand(23) > 0.3
    loss, stats = fused_linear_reverse_kl(h_s, h_t, w, w_t, student_bias=b, mask=mask, temperature=1.4,
                                          return_stats=True, backend=BACKEND)
    assert isinstance(stats, TokenStats)
    exact = reference.token_statistics(h_s.double(), h_t.double(), w.double(), w_t.double(),
                                       student_bias=b.double(), temperature=1.4)
    per_token = reference.fused_linear_divergence(h_s.double(), h_t.double(), w.double(), w_t.double(),
                                                  student_bias=b.double(), temperature=1.4, reduction="none")
    for ours, theirs in [(stats.student_lse, exact["student_lse"]), (stats.teacher_lse, exact["teacher_lse"]),
                         (stats.student_entropy, exact["student_entropy"]), (stats.divergence, per_token)]:
        torch.testing.assert_close(ours[mask].double(), theirs[mask], rtol=1e-5, atol=1e-5)
        assert (ours[~mask] == 0).all()
    assert torch.equal(stats.counted, mask)
    torch.testing.assert_close(loss.double(), per_token[mask].mean(), rtol=1e-5, atol=1e-6)


def test_peaky_logits(seed):
    """Rows of W equal to hidden states: one logit dominates each row; the teacher's peak is
    another row's token, so the divergence and its gradient are large."""
    h_s, _, w, _, _ = make_inputs(19, 24, 509, spread=3.0)
    w[:19] = h_s * 2.0
    h_t = torch.roll(h_s, 1, dims=0) + 0.1 * torch.randn_like(h_s)
    assert_close_to_truth((h_s, h_t, w, None, None), reduction="mean")


def test_huge_logits_stay_finite_and_accurate(seed):
    h_s = torch.randn(9, 8)
    h_s = h_s / h_s.norm(dim=1, keepdim=True)
    w = torch.randn(97, 8)
    w[:9] = h_s * 1e4  # student logits up to 1e4
    h_t = torch.roll(h_s, 1, dims=0)  # the teacher puts its mass elsewhere: a large KL
    loss = fused_linear_reverse_kl(h_s, h_t, w, reduction="none", backend=BACKEND)
    exact = reference.fused_linear_divergence(h_s.double(), h_t.double(), w.double(), reduction="none")
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss.double(), exact, rtol=1e-4, atol=1e-2)


def test_identical_student_and_teacher_give_exact_zero(seed):
    h, _, w, _, _ = make_inputs(13, 10, 401, spread=4.0)
    leaf = h.clone().requires_grad_(True)
    per_token = fused_linear_reverse_kl(leaf, h, w, reduction="none", backend=BACKEND)
    assert (per_token == 0).all()
    per_token.sum().backward()
    assert leaf.grad.abs().max() < 1e-6


def test_nothing_counted_gives_zero_loss_and_zero_grads(seed):
    h_s, h_t, w, _, b = make_inputs(6, 5, 50, bias=True)
    for reduction in ("mean", "sum", "none"):
        loss, grads = run_with_grads(h_s, h_t, w, b, mask=torch.zeros(6, dtype=torch.bool), reduction=reduction)
        assert (loss == 0).all() and all((g == 0).all() for g in grads)
    empty = torch.zeros(0, 5)
    loss, grads = run_with_grads(empty, empty, w, None)
    assert loss.item() == 0 and all((g == 0).all() for g in grads)


def run_with_grads(h_s, h_t, w, b, **kwargs):
    leaves = [t.clone().requires_grad_(True) for t in (h_s, w) + ((b,) if b is not None else ())]
    loss = fused_linear_reverse_kl(leaves[0], h_t, leaves[1], student_bias=leaves[2] if b is not None else None,
                                   backend=BACKEND, **kwargs)
    loss.sum().backward()
    return loss, [leaf.grad for leaf in leaves]


def test_non_finite_inputs_propagate_and_masked_rows_are_ignored(seed):
    h_s, h_t, w, _, _ = make_inputs(8, 6, 70)
    h_s[3, 2] = float("nan")
    assert torch.isnan(fused_linear_reverse_kl(h_s, h_t, w, backend=BACKEND))
    mask = torch.ones(8, dtype=torch.bool)
    mask[3] = False
    assert torch.isfinite(fused_linear_reverse_kl(h_s, h_t, w, mask=mask, backend=BACKEND))
    h_t[5, 0] = float("inf")
    assert not torch.isfinite(fused_linear_reverse_kl(h_s, h_t, w, mask=mask, backend=BACKEND))


def test_non_contiguous_inputs(seed):
    h_s, h_t, w, _, _ = make_inputs(15, 12, 211)
    wide = torch.randn(15, 24)
    wide[:, ::2] = h_s
    w_t = torch.randn(12, 211).T  # a transposed view
    contiguous = fused_linear_reverse_kl(h_s, h_t, w, w_t.contiguous(), backend=BACKEND)
    strided = fused_linear_reverse_kl(wide[:, ::2], h_t, w, w_t, backend=BACKEND)
    torch.testing.assert_close(strided, contiguous)


def test_teacher_side_is_detached(seed):
    h_s, h_t, w, w_t, _ = make_inputs(7, 4, 33, shared=False)
    h_t.requires_grad_(True)
    w_t.requires_grad_(True)
    fused_linear_reverse_kl(h_s.requires_grad_(True), h_t, w, w_t, backend=BACKEND).backward()
    assert h_t.grad is None and w_t.grad is None and h_s.grad is not None


class AllocationRecorder(TorchDispatchMode):
    """Records the element count of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_memory_contract_no_tokens_by_vocab_tensor(seed, reduction):
    n, d, vocab = 512, 8, 151_936
    h_s, h_t, w, _, _ = make_inputs(n, d, vocab)
    h_s.requires_grad_(True)
    w.requires_grad_(True)
    with AllocationRecorder() as recorder:
        fused_linear_reverse_kl(h_s, h_t, w, reduction=reduction, backend=BACKEND).sum().backward()
    assert recorder.largest < n * vocab // 4, f"a tensor of {recorder.largest} elements was allocated"


BAD_INPUTS = [
    (dict(student_hidden=torch.randn(4, 6)), ValueError, "hidden size"),
    (dict(teacher_hidden=torch.randn(5, 5)), ValueError, "leading"),
    (dict(lm_head_weight=torch.randn(30, 5, dtype=torch.float64)), TypeError, "cast"),
    (dict(teacher_hidden=torch.randn(4, 5).half()), TypeError, "teacher_hidden"),
    (dict(mask=torch.ones(5, dtype=torch.bool)), ValueError, "mask has 5"),
    (dict(mask=torch.ones(4)), TypeError, "mask must be bool"),
    (dict(mask=torch.full((4,), 2)), ValueError, "only 0 and 1"),
    (dict(token_weights=torch.ones(3)), ValueError, "token_weights has 3"),
    (dict(student_bias=torch.randn(29)), ValueError, "student_bias"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(divergence="kl"), ValueError, "divergence"),
    (dict(divergence="jsd", beta=1.5), ValueError, "beta"),
    (dict(student_softcap=-1.0), ValueError, "student_softcap"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(lm_head_weight=torch.randn(30, 5).long()), TypeError, "lm_head_weight"),
    (dict(teacher_lm_head_weight=torch.randn(31, 5)), ValueError, "vocabulary"),
    (dict(student_hidden=torch.randn(4)), ValueError, "student_hidden"),
    (dict(student_hidden=[[1.0]]), TypeError, "student_hidden"),
    (dict(lm_head_weight=torch.randn(30, 5, device="meta")), ValueError, "lm_head_weight is on meta"),
]


@pytest.mark.parametrize("bad,error,words", BAD_INPUTS, ids=[w for _, _, w in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(bad, error, words):
    args = dict(student_hidden=torch.randn(4, 5), teacher_hidden=torch.randn(4, 5), lm_head_weight=torch.randn(30, 5))
    args.update(bad)
    positional = [args.pop(k) for k in ("student_hidden", "teacher_hidden", "lm_head_weight")]
    with pytest.raises(error, match=words):
        fused_linear_divergence(*positional, backend=args.pop("backend", BACKEND), **args)


def test_reverse_kl_entry_point_refuses_other_divergences():
    h = torch.randn(2, 3)
    with pytest.raises(TypeError, match="fused_linear_divergence"):
        fused_linear_reverse_kl(h, h, torch.randn(4, 3), divergence="jsd")


def test_unavailable_backend_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    h = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fused_linear_reverse_kl(h, h, torch.randn(4, 3), backend="triton")


def test_raw_lse_is_reported_in_stats_and_needs_a_scalar_reduction(seed):
    h_s, h_t, w, _, _ = make_inputs(11, 7, 97)
    mask = torch.rand(11) > 0.3
    _, stats = fused_linear_reverse_kl(h_s, h_t, w, mask=mask, temperature=3.0, student_softcap=2.0,
                                       _raw_lse_coeff=torch.zeros(11), return_stats=True, backend=BACKEND)
    exact = reference.token_statistics(h_s.double(), h_t.double(), w.double(), temperature=3.0, student_softcap=2.0)
    torch.testing.assert_close(stats.student_raw_lse[mask].double(), exact["student_raw_lse"][mask])
    assert fused_linear_reverse_kl(h_s, h_t, w, return_stats=True, backend=BACKEND)[1].student_raw_lse is None
    with pytest.raises(ValueError, match="scalar reduction"):
        fused_linear_reverse_kl(h_s, h_t, w, reduction="none", _raw_lse_coeff=torch.ones(11), backend=BACKEND)
