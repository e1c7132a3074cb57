"""crisp_fast.integrations.liger.FusedLinearJSDLoss against Liger's chunked LigerFusedLinearJSDLoss,
and crisp_fast.FusedLinearJSD against Liger's Triton LigerFusedLinearJSD (Triton interpreter on
CPU tensors; tests/conftest.py sets TRITON_INTERPRET=1). Values and gradients, beta in {0, 0.5, 1},
with and without the hard loss, temperature != 1, ignore_index, biases, different hidden sizes,
fp32 and bf16 (bf16 judged against an fp64 truth). Budget: ~25 s on 2 quiet cores (~60 s at load 13).

    PYTHONPATH=. pytest tests/test_integrations_liger.py -q
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("liger_kernel")
from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # noqa: E402

from crisp_fast import FusedLinearJSD, reference  # noqa: E402
from crisp_fast.integrations.liger import FusedLinearJSDLoss  # noqa: E402

IGNORE = -100


def _inputs(dtype, *, n=41, d=24, d_teacher=40, vocab=211, teacher_vocab=None, bias=True, ignore_every=4):
    teacher_vocab = teacher_vocab or vocab
    hs = torch.randn(n, d).to(dtype)
    ht = torch.randn(n, d_teacher).to(dtype)
    ws = (torch.randn(vocab, d) / d**0.5 * 2).to(dtype)
    wt = (torch.randn(teacher_vocab, d_teacher) / d_teacher**0.5 * 2).to(dtype)
    bs = torch.randn(vocab).to(dtype) if bias else None
    bt = torch.randn(teacher_vocab).to(dtype) if bias else None
    labels = torch.randint(0, vocab, (n,))
    if ignore_every:
        labels[torch.randperm(n)[: n // ignore_every]] = IGNORE
    return hs, ws, ht, wt, labels, bs, bt


def _run(module, hs, ws, ht, wt, labels, bs, bt):
    """(loss, soft, hard, grad_hidden, grad_weight, grad_bias); soft/hard None unless returned."""
    hs, ws = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    bs = None if bs is None else bs.clone().requires_grad_()
    out = module(hs, ws, ht, wt, labels, bs, bt)
    loss, soft, hard = out if isinstance(out, tuple) else (out, None, None)
    loss.backward()
    return loss.detach(), soft, hard, hs.grad, ws.grad, None if bs is None else bs.grad


def _truth(hs, ws, ht, wt, labels, bs, bt, *, weight_hard_loss, weight_soft_loss, beta, temperature):
    """fp64 from crisp_fast.reference: soft JSD on tempered logits, CE on untempered, both / n."""
    hs, ws, ht, wt = (x.double() for x in (hs, ws, ht, wt))
    bs = None if bs is None else bs.double().requires_grad_()
    bt = None if bt is None else bt.double()
    hs.requires_grad_(), ws.requires_grad_()
    counted = labels != IGNORE
    n = max(int(counted.sum()), 1)
    ys = reference.logits(hs, ws, bs)
    if wt.shape[0] > ws.shape[0]:  # Liger pads the smaller student vocabulary's logits with zeros
        ys = torch.cat([ys, ys.new_zeros(ys.shape[0], wt.shape[0] - ws.shape[0])], dim=1)
    yt = reference.logits(ht, wt, bt)
    per_token = reference.divergence_from_logits(ys, yt, divergence="jsd", beta=beta, temperature=temperature)
    soft = torch.where(counted, per_token, torch.zeros_like(per_token)).sum() / n
    log_p = torch.log_softmax(ys[:, : ws.shape[0]], dim=-1)
    safe_labels = torch.where(counted, labels, torch.zeros_like(labels))
    ce = -log_p.gather(1, safe_labels[:, None]).squeeze(1)
    hard = torch.where(counted, ce, torch.zeros_like(ce)).sum() / n
    loss = weight_hard_loss * hard + weight_soft_loss * soft
    loss.backward()
    return loss.detach(), soft.detach(), hard.detach(), hs.grad, ws.grad, None if bs is None else bs.grad


def _error(actual, expected):
    return (actual.double() - expected.double()).abs().max().item()


def _assert_close(actual, expected, *, rtol, atol, what):
    bound = atol + rtol * expected.double().abs().max().item()
    assert _error(actual, expected) <= bound, f"{what}: max error {_error(actual, expected):.3g} > {bound:.3g}"


NAMES = ("loss", "soft_loss", "hard_loss", "grad student_input", "grad student_weight", "grad student_bias")


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("weight_hard_loss", [0.0, 0.4])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_chunked_fp32_matches_liger_and_fp64(seed, beta, weight_hard_loss, temperature):
    inputs = _inputs(torch.float32)
    options = dict(weight_hard_loss=weight_hard_loss, weight_soft_loss=0.7, beta=beta, ignore_index=IGNORE,
                   temperature=temperature, return_soft_hard_loss=True)
    ours = _run(FusedLinearJSDLoss(**options), *inputs)
    theirs = _run(LigerFusedLinearJSDLoss(**options, compiled=False, chunk_size=16), *inputs)
    truth = _truth(*inputs, weight_hard_loss=weight_hard_loss, weight_soft_loss=0.7, beta=beta,
                   temperature=temperature)
    for name, mine, liger, exact in zip(NAMES, ours, theirs, truth):
        _assert_close(mine, liger, rtol=1e-5, atol=1e-6, what=f"{name} vs Liger")
        _assert_close(mine, exact, rtol=1e-5, atol=1e-6, what=f"{name} vs fp64")
    assert ours[1].requires_grad is False and ours[2].requires_grad is False


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_bf16_at_least_as_close_to_fp64_as_liger(seed, beta):
    """bf16 inputs: Liger's soft loss works on bf16 logits, ours on fp32 logits; both are judged
    against fp64 on the same (bf16) inputs, and ours must be about as close as Liger's or closer."""
    inputs = _inputs(torch.bfloat16)
    options = dict(weight_hard_loss=0.3, weight_soft_loss=0.7, beta=beta, temperature=1.5)
    ours = _run(FusedLinearJSDLoss(**options), *inputs)
    theirs = _run(LigerFusedLinearJSDLoss(**options, compiled=False, chunk_size=16), *inputs)
    truth = _truth(*inputs, weight_hard_loss=0.3, weight_soft_loss=0.7, beta=beta, temperature=1.5)
    assert ours[3].dtype == ours[4].dtype == ours[5].dtype == torch.bfloat16
    for index in (0, 3, 4, 5):
        scale = truth[index].abs().max().item()
        # the slack is bf16's half-ulp of the largest entry: a rounding of the output itself
        assert _error(ours[index], truth[index]) <= _error(theirs[index], truth[index]) + 2**-9 * scale, (
            f"{NAMES[index]}: ours {_error(ours[index], truth[index]):.3g}, "
            f"Liger {_error(theirs[index], truth[index]):.3g}")
        _assert_close(ours[index], truth[index], rtol=1e-2, atol=1e-4, what=f"bf16 {NAMES[index]}")


@pytest.mark.parametrize("case", ["no_bias", "same_hidden_size", "nothing_ignored", "ignore_index_7",
                                  "teacher_vocab_padded", "loss_only", "awkward_shape"])
def test_chunked_variants_match_liger(seed, case):
    kwargs = dict(bias=case != "no_bias", d_teacher=24 if case == "same_hidden_size" else 40,
                  ignore_every=0 if case == "nothing_ignored" else 4)
    if case == "teacher_vocab_padded":
        kwargs["teacher_vocab"] = 229
    if case == "awkward_shape":
        kwargs.update(n=1, d=3, d_teacher=5, vocab=1271)
    inputs = _inputs(torch.float32, **kwargs)
    ignore_index = 7 if case == "ignore_index_7" else IGNORE
    if case == "ignore_index_7":
        inputs[4][inputs[4] == IGNORE] = 7
    options = dict(weight_hard_loss=0.25, weight_soft_loss=0.6, beta=0.3, ignore_index=ignore_index,
                   temperature=0.8, return_soft_hard_loss=case != "loss_only")
    ours = _run(FusedLinearJSDLoss(**options), *inputs)
    theirs = _run(LigerFusedLinearJSDLoss(**options, compiled=False), *inputs)
    for name, mine, liger in zip(NAMES, ours, theirs):
        if liger is None:
            assert mine is None, name
            continue
        _assert_close(mine, liger, rtol=1e-5, atol=1e-6, what=f"{case} {name}")


def test_chunked_everything_ignored_is_zero(seed):
    inputs = _inputs(torch.float32)
    inputs[4][:] = IGNORE
    loss, soft, hard, grad_hidden, grad_weight, _ = _run(FusedLinearJSDLoss(return_soft_hard_loss=True), *inputs)
    assert loss.item() == soft.item() == hard.item() == 0.0
    assert torch.count_nonzero(grad_hidden) == 0 and torch.count_nonzero(grad_weight) == 0
    assert _run(LigerFusedLinearJSDLoss(compiled=False), *inputs)[0].item() == 0.0


def test_chunked_soft_only_without_labels(seed):
    hs, ws, ht, wt, _, bs, bt = _inputs(torch.float32)
    all_counted = torch.zeros(hs.shape[0], dtype=torch.long)
    ours = _run(FusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0), hs, ws, ht, wt, None, bs, bt)
    with_labels = _run(FusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0), hs, ws, ht, wt,
                       all_counted, bs, bt)
    _assert_close(ours[0], with_labels[0], rtol=1e-6, atol=0, what="labels None")


def test_chunked_bad_inputs_raise(seed):
    hs, ws, ht, wt, labels, bs, bt = _inputs(torch.float32)
    loss = FusedLinearJSDLoss()
    with pytest.raises(ValueError, match="true_labels is None"):
        loss(hs, ws, ht, wt, None)
    bad = labels.clone()
    bad[0] = ws.shape[0]
    with pytest.raises(ValueError, match="outside"):
        loss(hs, ws, ht, wt, bad)
    with pytest.raises(TypeError, match="integer"):
        loss(hs, ws, ht, wt, labels.float())
    with pytest.raises(ValueError, match="elements"):
        loss(hs, ws, ht, wt, labels[:-1])
    with pytest.raises(ValueError, match="larger than"):
        loss(hs, ws, ht, wt[:-3], labels)
    with pytest.raises(ValueError, match="temperature"):
        FusedLinearJSDLoss(temperature=0)
    with pytest.raises(ValueError, match="beta"):
        FusedLinearJSDLoss(beta=1.5)
    with pytest.raises(TypeError, match="teacher_hidden"):
        loss(hs, ws, ht.double(), wt, labels)


# --------------------------------------------------------------------------------------------
# crisp_fast.FusedLinearJSD vs Liger's Triton LigerFusedLinearJSD (interpreter, small shapes)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("with_labels", [True, False])
def test_triton_module_drop_in_matches_liger(seed, beta, with_labels):
    from liger_kernel.transformers import LigerFusedLinearJSD

    hs, ws, ht, wt, labels, _, _ = _inputs(torch.float32, n=13, d=16, d_teacher=24, vocab=97)
    labels = labels if with_labels else None
    results = []
    for module in (FusedLinearJSD(jsd_beta=beta, temperature=1.7), LigerFusedLinearJSD(jsd_beta=beta, temperature=1.7)):
        hidden, weight = hs.clone().requires_grad_(), ws.clone().requires_grad_()
        loss = module(hidden, weight, ht, wt, labels)
        loss.backward()
        results.append((loss.detach(), hidden.grad, weight.grad))
    for name, mine, liger in zip(("loss", "grad input", "grad weight"), *results):
        _assert_close(mine, liger, rtol=1e-5, atol=1e-6, what=f"FusedLinearJSD {name}")
