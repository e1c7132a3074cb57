"""The API of crisp_fast.loss: shapes, masks, reductions, validation, backend choice, TokenStats.

Numerics (every backend against a float64 truth) live in tests/test_backends.py; these checks run
through the torch backend (which runs anywhere) and are about the contract, not rounding.
"""
import logging

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
    per_token = fused_linear_reverse_kl(*inputs[:3], reduction="none", mask=mask, backend=BACKEND)
    weighted = fused_linear_reverse_kl(*inputs[:3], token_weights=weights, mask=mask, backend=BACKEND)
    torch.testing.assert_close(weighted, (per_token * weights).sum())


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


def test_token_stats_fields_and_uncounted_rows(seed):
    h_s, h_t, w, _, _ = make_inputs(13, 6, 101)
    mask = torch.rand(13) > 0.3
    _, stats = fused_linear_reverse_kl(h_s, h_t, w, mask=mask, return_stats=True, backend=BACKEND)
    assert isinstance(stats, TokenStats)
    assert TokenStats._fields == ("divergence", "student_lse", "teacher_lse", "student_entropy", "teacher_entropy",
                                  "counted", "student_raw_lse")
    for name in ("divergence", "student_lse", "teacher_lse", "student_entropy", "teacher_entropy"):
        value = getattr(stats, name)
        assert value.shape == (13,) and value.dtype == torch.float32 and (value[~mask] == 0).all(), name
    assert torch.equal(stats.counted, mask) and stats.student_raw_lse is None
    # a distribution scored against itself: its entropy on both sides
    _, same = fused_linear_reverse_kl(h_s, h_s, w, return_stats=True, backend=BACKEND)
    torch.testing.assert_close(same.student_entropy, same.teacher_entropy)


def test_backend_registry_and_protocol():
    from crisp_fast.backends import BACKENDS, Backend, FusedBackend, load_backend

    assert set(BACKENDS) == {"torch", "native", "triton"}
    torch_backend = load_backend("torch")
    assert isinstance(torch_backend, Backend) and isinstance(torch_backend, FusedBackend)
    assert torch_backend.is_available() == (True, "")
    with pytest.raises(ValueError, match="backend must be one of"):
        load_backend("cuda")


def test_auto_on_cpu_without_native_warns_once(monkeypatch, caplog):
    import crisp_fast.loss as loss_module

    monkeypatch.setattr(loss_module, "_native_why_not", lambda: "the C++ extension is not built (test)")
    monkeypatch.setattr(loss_module, "_NATIVE_WARNED", False)
    h = torch.randn(3, 4)
    with caplog.at_level(logging.WARNING, logger="crisp_fast.loss"):
        fused_linear_reverse_kl(h, h, torch.randn(9, 4))
        fused_linear_reverse_kl(h, h, torch.randn(9, 4))
    messages = [r.getMessage() for r in caplog.records if r.name == "crisp_fast.loss"]
    assert len(messages) == 1 and "not built (test)" in messages[0] and "pip install" in messages[0]


def test_deterministic_reaches_the_backend(monkeypatch):
    import crisp_fast.backends.torch as torch_backend

    seen = []
    original = torch_backend.forward_backward

    def spy(*args, **kwargs):
        seen.append(kwargs["deterministic"])
        return original(*args, **kwargs)

    monkeypatch.setattr(torch_backend, "forward_backward", spy)
    # another test (the demo) may have switched deterministic algorithms on for the process
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
    h, w = torch.randn(3, 4, requires_grad=True), torch.randn(9, 4)
    fused_linear_reverse_kl(h, h.detach(), w, backend=BACKEND, deterministic=True).backward()
    fused_linear_reverse_kl(h, h.detach(), w, backend=BACKEND).backward()
    assert seen == [True, False]
    with pytest.raises(TypeError, match="deterministic"):
        fused_linear_reverse_kl(h, h, w, backend=BACKEND, deterministic=1)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_frozen_weight_skips_the_weight_gradient(seed, reduction):
    """lm_head without requires_grad (LoRA): no [V, D] gradient is ever allocated (3 GEMMs, not 4)."""
    n, d, vocab = 6, 64, 20_011  # more than one vocabulary block (a block view of W is not an allocation)
    h_s, h_t, w, _, _ = make_inputs(n, d, vocab)
    h_s.requires_grad_(True)
    with AllocationRecorder() as recorder:
        fused_linear_reverse_kl(h_s, h_t, w, reduction=reduction, backend=BACKEND).sum().backward()
    assert w.grad is None and h_s.grad is not None
    assert recorder.largest < vocab * d, f"a tensor of {recorder.largest} elements was allocated"
