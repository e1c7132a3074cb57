"""The fused linear divergence: the math contract, in one place.

    loss = crisp_fast.fused_linear_reverse_kl(student_hidden, teacher_hidden, lm_head_weight)

computes, for every counted token i, KL(P_i || Q_i) with P_i = softmax(h_s[i] W^T / T) (the
student) and Q_i = softmax(h_t[i] W_t^T / T) (the teacher), straight from the final hidden
states and the lm_head weight: no backend ever holds a tokens x vocab tensor. The exact
definitions, including logit scale, softcapping, forward KL and generalized JSD, are in
`crisp_fast.reference`; this module validates inputs, applies masks, token weights and the
reduction, picks a backend and wires autograd. Backends (`crisp_fast.backends`) only compute.

Contract
--------
* Shapes: hidden states are `[N, D]` or `[B, T, D]` (flattened row-major; `mask` and
  `token_weights` are flattened the same way and must have N elements). `lm_head_weight` is
  `[V, D]`; `teacher_lm_head_weight` is `[V, Dt]` (None: the teacher shares `lm_head_weight`).
* Dtypes: float32, bfloat16 or float16 (float64 on the torch backend). Each side's hidden states
  must have the dtype of that side's weight. Logits and all statistics are computed in fp32;
  the gradient of the weight is accumulated in fp32 and returned in the weight's dtype.
* Gradients flow to `student_hidden`, `lm_head_weight` and `student_bias` only. The teacher side
  (`teacher_hidden`, `teacher_lm_head_weight`, `teacher_bias`) is detached by contract, even when
  it requires grad; a weight shared by both sides receives the student-side gradient only.
* `mask` (bool or 0/1, True = counted): masked-out rows are dropped before any compute, so NaN in
  them is harmless. `token_weights` (float) multiply each row's divergence.
* Reductions (m = mask, w = token_weights, D_i = divergence of row i):
      "none": m_i * w_i * D_i per row, shape [N] (differentiable, any upstream gradient)
      "sum":  sum_i m_i * w_i * D_i
      "mean": without weights sum_i m_i D_i / max(sum_i m_i, 1) (0 when nothing is counted);
              with weights the weighted sum sum_i m_i w_i D_i: the weights carry the
              normalisation (e.g. 1 / tokens in the global batch).
* Divergences are clamped at 0 (they are non-negative; rounding can leave -1e-9). The gradient
  is that of the unclamped value.
* `-inf` bias or logit entries are valid (banned tokens): p = 0 there, and the result is the exact
  finite one (e.g. reverse KL and JSD stay finite; forward KL is +inf where the teacher has mass and
  the student has none). A counted row whose logits are all `-inf` (on either side) has no
  distribution: its divergence, statistics and gradients are NaN, by contract.
* Other non-finite inputs in counted rows (NaN, +inf) propagate: the loss is NaN or inf, never a
  finite wrong number.
* Accuracy: fp32 results are within about 2x the error of the plain materialised fp32 computation
  (`crisp_fast.reference` on the same inputs) at any logit scale (|logits| up to 1e4 tested),
  temperature and vocabulary size; bf16/fp16 inputs within 2x of that computation on the inputs
  upcast to fp32. Backends form every probability from max-shifted logits (crisp_fast.backends).
* `deterministic=True` (or `torch.use_deterministic_algorithms(True)`) makes gradients bitwise
  identical run to run on every backend (the CPU backends always are).
* Memory: beyond the outputs, a CPU backend holds at most `workspace_bytes` of scratch (default
  40% of the irreducible gradients dW + dh, so the peak stays under 1.5x them); a larger budget
  buys larger row chunks, i.e. faster GEMMs (native: 4 GEMMs on full-vocabulary rows instead of
  6 streaming ones). The Triton backend keeps its tiles on chip and ignores it.
* A weight gradient is computed only when `lm_head_weight.requires_grad` (a frozen head, e.g. LoRA,
  costs 3 GEMMs instead of 4).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import NamedTuple

import torch

from crisp_fast.backends import (
    BACKENDS as BACKEND_REGISTRY, DIVERGENCES, GRAD_SHIFT, LOSS, STUDENT_ENTROPY, STUDENT_LOG_Z, STUDENT_MAX,
    STUDENT_RAW_LOG_Z, STUDENT_RAW_MAX, TEACHER_ENTROPY, TEACHER_LOG_Z, TEACHER_MAX, Backend, DivergenceOptions,
    FusedBackend, load_backend,
)

logger = logging.getLogger(__name__)

BACKENDS = ("auto",) + tuple(BACKEND_REGISTRY)
REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class TokenStats(NamedTuple):
    """Per-token statistics from the same pass as the loss, for logging (no gradient).
    Every field has N rows (the flattened tokens); rows that were not counted hold 0."""

    divergence: torch.Tensor       # the unweighted divergence of each row
    student_lse: torch.Tensor      # logsumexp of the tempered student logits (max + log Z, fp32)
    teacher_lse: torch.Tensor      # logsumexp of the tempered teacher logits
    student_entropy: torch.Tensor  # entropy of the tempered student distribution, in nats
    teacher_entropy: torch.Tensor  # entropy of the tempered teacher distribution, in nats
    counted: torch.Tensor          # bool: the row took part in the loss
    student_raw_lse: torch.Tensor | None = None  # logsumexp of the untempered student logits
                                                 # (only when `_raw_lse_coeff` was given)


# --------------------------------------------------------------------------------------------
# backend choice
# --------------------------------------------------------------------------------------------
def backend_module(name: str) -> Backend:
    """The backend module for `name` ("torch", "triton", "native"); RuntimeError says why not."""
    module = load_backend(name)
    available, why = module.is_available()
    if not available:
        raise RuntimeError(f"backend={name!r} is not available here: {why}")
    return module


def available_backends() -> dict[str, str]:
    """Every registered backend and either 'ok' or the reason it cannot run here."""
    report = {}
    for name in BACKEND_REGISTRY:
        try:
            available, why = load_backend(name).is_available()
            report[name] = "ok" if available else why
        except ImportError as error:  # pragma: no cover - an import error is the reason
            report[name] = f"import failed: {error}"
    return report


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend module a call with `backend` ("auto" or a name) runs for tensors on `device`
    of `dtype`: "auto" is Triton on CUDA, native on CPU when built (else torch, with a logged
    line). Raises ValueError / RuntimeError / TypeError saying why a named one cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            backend = "triton"
        elif device.type == "cpu" and dtype != torch.float64 and _native_usable():
            backend = "native"
        else:
            if device.type == "cpu" and dtype != torch.float64:
                _warn_native_missing()
            backend = "torch"
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    if dtype == torch.float64 and backend != "torch":
        raise TypeError(f"float64 inputs are supported by backend='torch' only, not {backend!r}")
    return backend_module(backend)


_NATIVE_WARNED = False


def _native_why_not() -> str:
    try:
        available, why = load_backend("native").is_available()
    except ImportError as error:
        return f"crisp_fast.backends.native does not import ({error})"
    return "" if available else why


def _native_usable() -> bool:
    return _native_why_not() == ""


def _warn_native_missing() -> None:
    """backend="auto" on CPU without the native extension: say so once (never a silent fallback)."""
    global _NATIVE_WARNED
    if _NATIVE_WARNED:
        return
    _NATIVE_WARNED = True
    logger.warning("crisp_fast: backend='auto' uses the slower pure-PyTorch backend on CPU because the native "
                   "backend is unavailable: %s. Build it in a source checkout with "
                   "`pip install --no-build-isolation -e .` (or set CRISP_FAST_NATIVE_JIT=1).", _native_why_not())


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def _check_tensor(name, value, *, dims):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(value.shape)}")
    if value.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {value.dtype}")


def _check_number(name, value, *, positive=False, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, torch.Tensor) or not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _validate(student_hidden, teacher_hidden, weight, teacher_weight, student_bias, teacher_bias,
              mask, token_weights, reduction, options: DivergenceOptions):
    _check_tensor("student_hidden", student_hidden, dims=(2, 3))
    _check_tensor("teacher_hidden", teacher_hidden, dims=(2, 3))
    _check_tensor("lm_head_weight", weight, dims=(2,))
    if teacher_weight is not None:
        _check_tensor("teacher_lm_head_weight", teacher_weight, dims=(2,))
    n = student_hidden.numel() // max(student_hidden.shape[-1], 1)
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden "
                         f"{tuple(teacher_hidden.shape)} must have the same leading (token) dimensions")
    vocab, d = weight.shape
    if student_hidden.shape[-1] != d:
        raise ValueError(f"student_hidden has hidden size {student_hidden.shape[-1]} but lm_head_weight "
                         f"{tuple(weight.shape)} expects {d}")
    t_weight = weight if teacher_weight is None else teacher_weight
    if teacher_weight is not None and teacher_weight.shape[0] != vocab:
        raise ValueError(f"teacher_lm_head_weight has vocabulary {teacher_weight.shape[0]} but lm_head_weight has {vocab}")
    if teacher_hidden.shape[-1] != t_weight.shape[1]:
        which = "lm_head_weight (shared)" if teacher_weight is None else "teacher_lm_head_weight"
        raise ValueError(f"teacher_hidden has hidden size {teacher_hidden.shape[-1]} but {which} "
                         f"{tuple(t_weight.shape)} expects {t_weight.shape[1]}")
    if student_hidden.dtype != weight.dtype:
        raise TypeError(f"student_hidden is {student_hidden.dtype} but lm_head_weight is {weight.dtype}; "
                        "cast one to the other (e.g. lm_head_weight.to(student_hidden.dtype))")
    if teacher_hidden.dtype != t_weight.dtype:
        which = "lm_head_weight (shared)" if teacher_weight is None else "teacher_lm_head_weight"
        raise TypeError(f"teacher_hidden is {teacher_hidden.dtype} but {which} is {t_weight.dtype}")
    tensors = {"student_hidden": student_hidden, "teacher_hidden": teacher_hidden, "lm_head_weight": weight,
               "teacher_lm_head_weight": teacher_weight, "student_bias": student_bias,
               "teacher_bias": teacher_bias, "mask": mask, "token_weights": token_weights}
    for name, value in tensors.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(value).__name__}")
        if value is not None and value.device != student_hidden.device:
            raise ValueError(f"{name} is on {value.device} but student_hidden is on {student_hidden.device}")
    for name, bias in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if bias is not None and (bias.dim() != 1 or bias.shape[0] != vocab):
            raise ValueError(f"{name} must have shape [{vocab}], got {tuple(bias.shape)}")
        if bias is not None and not bias.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {bias.dtype}")
    if mask is not None:
        if mask.numel() != n:
            raise ValueError(f"mask has {mask.numel()} elements but there are {n} tokens")
        if mask.is_floating_point() or mask.is_complex():
            raise TypeError(f"mask must be bool (or integer 0/1), got {mask.dtype}")
        if mask.dtype != torch.bool and ((mask != 0) & (mask != 1)).any():
            raise ValueError("an integer mask must hold only 0 and 1")
    if token_weights is not None:
        if token_weights.numel() != n:
            raise ValueError(f"token_weights has {token_weights.numel()} elements but there are {n} tokens")
        if not token_weights.is_floating_point():
            raise TypeError(f"token_weights must be floating point, got {token_weights.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if options.divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {options.divergence!r}")
    _check_number("beta", options.beta)
    if not 0.0 <= options.beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {options.beta}")
    _check_number("temperature", options.temperature, positive=True)
    _check_number("student_logit_scale", options.student_scale)
    _check_number("teacher_logit_scale", options.teacher_scale)
    _check_number("student_softcap", options.student_softcap, positive=True, allow_none=True)
    _check_number("teacher_softcap", options.teacher_softcap, positive=True, allow_none=True)


def _canonical(options: DivergenceOptions) -> DivergenceOptions:
    """jsd at beta 0 and 1 is forward and reverse KL (the Liger/TRL convention); say so once here."""
    if options.divergence == "jsd" and options.beta in (0.0, 1.0):
        kind = "forward_kl" if options.beta == 0.0 else "reverse_kl"
        return dataclasses.replace(options, divergence=kind)
    return options


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------
def _split_lse(stats, max_column, log_z_column):
    """max + log Z added in float64 and rounded once (both are exact fp32 statistics)."""
    return (stats[:, max_column].double() + stats[:, log_z_column].double()).to(stats.dtype)


def _raw_lse(stats):
    return _split_lse(stats, STUDENT_RAW_MAX, STUDENT_RAW_LOG_Z)


# --------------------------------------------------------------------------------------------
def _student_grads(ctx, grad_hidden, grad_weight, grad_bias):
    """Cast backend gradients (fp32) to the dtypes of the inputs they belong to."""
    hidden_dtype, weight_dtype, bias_dtype = ctx.student_dtypes
    return (
        None if grad_hidden is None else grad_hidden.to(hidden_dtype),
        None if grad_weight is None else grad_weight.to(weight_dtype),
        None if grad_bias is None or bias_dtype is None else grad_bias.to(bias_dtype),
    )


def _dtypes(h_s, weight, bias):
    """Only the dtypes: the graph outlives backward while the caller holds the loss, and a tensor
    on ctx would keep the student's hidden states alive through the decoder's backward."""
    return h_s.dtype, weight.dtype, None if bias is None else bias.dtype


def _backend_args(ctx):
    h_s, h_t, weight, teacher_weight, b_s, b_t = ctx.saved_tensors[:6]
    return h_s, h_t, weight, (None if ctx.shared_weight else teacher_weight), b_s, b_t


class _PerTokenDivergence(torch.autograd.Function):
    """Rows -> (divergence [M], raw student lse [M], stats [M, NUM_STATS]); gradients recomputed in backward."""

    @staticmethod
    def forward(ctx, h_s, h_t, weight, teacher_weight, b_s, b_t, b_s_orig, backend, options):
        stats = backend.forward(h_s, h_t, weight, teacher_weight, b_s, b_t, **dataclasses.asdict(options))
        ctx.shared_weight = teacher_weight is None
        ctx.backend, ctx.options = backend, options
        ctx.student_dtypes = _dtypes(h_s, weight, b_s_orig)
        ctx.save_for_backward(h_s, h_t, weight, teacher_weight, b_s, b_t, stats)
        ctx.mark_non_differentiable(stats)
        return stats[:, LOSS].clamp_min(0.0), _raw_lse(stats), stats

    @staticmethod
    def backward(ctx, grad_loss, grad_raw_lse, _grad_stats):
        stats = ctx.saved_tensors[6]
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[6]
        raw = grad_raw_lse.to(stats.dtype).contiguous() if ctx.options.need_raw_lse else None
        grads = ctx.backend.backward(*_backend_args(ctx), stats, grad_loss.to(stats.dtype).contiguous(), raw,
                                     need_grad_hidden=need_hidden, need_grad_weight=need_weight,
                                     need_grad_bias=need_bias, **dataclasses.asdict(ctx.options))
        grad_hidden, grad_weight, grad_bias = _student_grads(ctx, *grads)
        return grad_hidden, None, grad_weight, None, None, None, grad_bias, None, None


class _ReducedDivergence(torch.autograd.Function):
    """Rows -> (sum_i c_i D_i + sum_i r_i rawlse_i, stats). The coefficients c (and r) are known
    before the loss is, so a backend with `forward_backward` produces the gradients in the same
    sweep as the statistics and backward only scales them by the upstream scalar."""

    @staticmethod
    def forward(ctx, h_s, h_t, weight, teacher_weight, b_s, b_t, b_s_orig, loss_coeff, raw_coeff, backend, options):
        kwargs = dataclasses.asdict(options)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[6]
        ctx.shared_weight = teacher_weight is None
        ctx.backend, ctx.options = backend, options
        ctx.student_dtypes = _dtypes(h_s, weight, b_s_orig)
        ctx.precomputed = None
        if (need_hidden or need_weight or need_bias) and isinstance(backend, FusedBackend):
            stats, ctx.precomputed = backend.forward_backward(
                h_s, h_t, weight, teacher_weight, b_s, b_t, loss_coeff, raw_coeff,
                need_grad_hidden=need_hidden, need_grad_weight=need_weight, need_grad_bias=need_bias, **kwargs)
            ctx.save_for_backward(stats)
        else:
            stats = backend.forward(h_s, h_t, weight, teacher_weight, b_s, b_t, **kwargs)
            ctx.save_for_backward(h_s, h_t, weight, teacher_weight, b_s, b_t, stats, loss_coeff, raw_coeff)
        ctx.mark_non_differentiable(stats)
        total = (loss_coeff * stats[:, LOSS].clamp_min(0.0)).sum()
        if raw_coeff is not None:
            total = total + (raw_coeff * _raw_lse(stats)).sum()
        return total, stats

    @staticmethod
    def backward(ctx, grad_total, _grad_stats):
        if ctx.precomputed is not None:
            # Scale in place and drop our reference: a second dW-sized copy here (or in autograd's
            # AccumulateGrad, which clones a gradient someone else still holds) would double the
            # peak memory of the whole loss.
            grads, ctx.precomputed = ctx.precomputed, None
            grads = tuple(None if g is None else g.mul_(grad_total) for g in grads)
        else:
            stats, loss_coeff, raw_coeff = ctx.saved_tensors[6:9]
            grads = ctx.backend.backward(
                *_backend_args(ctx), stats, (loss_coeff * grad_total).to(stats.dtype).contiguous(),
                None if raw_coeff is None else (raw_coeff * grad_total).to(stats.dtype).contiguous(),
                need_grad_hidden=ctx.needs_input_grad[0], need_grad_weight=ctx.needs_input_grad[2],
                need_grad_bias=ctx.needs_input_grad[6], **dataclasses.asdict(ctx.options))
        grad_hidden, grad_weight, grad_bias = _student_grads(ctx, *grads)
        return grad_hidden, None, grad_weight, None, None, None, grad_bias, None, None, None, None


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def fused_linear_divergence(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    divergence: str = "reverse_kl",
    beta: float = 1.0,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    backend: str = "auto",
    return_stats: bool = False,
    deterministic: bool = False,
    workspace_bytes: int | None = None,
    _raw_lse_coeff: torch.Tensor | None = None,
):
    """Divergence between student and teacher next-token distributions, from hidden states.

    `divergence` is "reverse_kl" (default, CRISP's KL(student || teacher)), "forward_kl"
    (KL(teacher || student)) or "jsd" with `beta` (Liger/TRL convention: beta = 0 is forward KL,
    beta = 1 reverse KL, M = beta * teacher + (1 - beta) * student). `backend` is "auto" (Triton
    for CUDA tensors, the native C++ backend for CPU tensors when built, else torch), "torch",
    "triton" (CPU tensors too, under TRITON_INTERPRET=1) or "native". See the module docstring
    for shapes, dtypes, masks and reductions. With `return_stats=True` returns
    `(loss, TokenStats)`. `deterministic=True` (also implied by
    `torch.are_deterministic_algorithms_enabled()`) asks for bitwise-repeatable gradients.
    `workspace_bytes` bounds the CPU backends' scratch (None: 40% of the gradients; more buys
    larger chunks, hence faster GEMMs; see the module docstring).
    """
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    if workspace_bytes is not None and (isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int)
                                        or workspace_bytes < 0):
        raise ValueError(f"workspace_bytes must be None or an int >= 0, got {workspace_bytes!r}")
    options = DivergenceOptions(divergence=divergence, beta=beta, temperature=temperature,
                                student_scale=student_logit_scale, teacher_scale=teacher_logit_scale,
                                student_softcap=student_softcap, teacher_softcap=teacher_softcap,
                                need_raw_lse=_raw_lse_coeff is not None,
                                deterministic=deterministic or torch.are_deterministic_algorithms_enabled(),
                                workspace_bytes=workspace_bytes)
    _validate(student_hidden, teacher_hidden, lm_head_weight, teacher_lm_head_weight, student_bias,
              teacher_bias, mask, token_weights, reduction, options)
    if _raw_lse_coeff is not None and reduction == "none":
        raise ValueError("_raw_lse_coeff needs a scalar reduction ('mean' or 'sum'), not 'none'")
    options = _canonical(options)
    module = resolve_backend(backend, student_hidden.device, student_hidden.dtype)

    d, d_t = student_hidden.shape[-1], teacher_hidden.shape[-1]
    h_s = student_hidden.reshape(-1, d)
    h_t = teacher_hidden.detach().reshape(-1, d_t)
    n = h_s.shape[0]
    counted = torch.ones(n, dtype=torch.bool, device=h_s.device) if mask is None else mask.reshape(-1) != 0
    # statistics are fp32 (fp64 only for fp64 inputs, which the torch backend accepts for testing)
    stat_dtype = torch.float64 if h_s.dtype == torch.float64 else torch.float32
    weights = None if token_weights is None else token_weights.reshape(-1).to(stat_dtype)
    rows = counted.nonzero().squeeze(1) if mask is not None else None

    if rows is not None:
        h_s, h_t = h_s.index_select(0, rows), h_t.index_select(0, rows)
        weights = None if weights is None else weights.index_select(0, rows)
    m = h_s.shape[0]
    if m == 0:
        return _nothing_counted(student_hidden, lm_head_weight, student_bias, n, reduction, return_stats, counted,
                                options.need_raw_lse)

    weight = lm_head_weight.contiguous()
    teacher_weight = None if teacher_lm_head_weight is None else teacher_lm_head_weight.detach().contiguous()
    b_s = None if student_bias is None else student_bias.detach().to(stat_dtype).contiguous()
    b_t = None if teacher_bias is None else teacher_bias.detach().to(stat_dtype).contiguous()
    args = (h_s.contiguous(), h_t.contiguous(), weight, teacher_weight, b_s, b_t, student_bias)

    if reduction == "none":
        per_row, _, stats = _PerTokenDivergence.apply(*args, module, options)
        if weights is not None:
            per_row = per_row * weights
        loss = per_row if rows is None else per_row.new_zeros(n).index_copy(0, rows, per_row)
    else:
        if weights is not None:
            coeff = weights
        elif reduction == "mean":
            coeff = torch.full((m,), 1.0 / m, device=h_s.device, dtype=stat_dtype)
        else:
            coeff = torch.ones(m, device=h_s.device, dtype=stat_dtype)
        raw_coeff = None if _raw_lse_coeff is None else _raw_lse_coeff.reshape(-1).to(stat_dtype)
        if raw_coeff is not None and rows is not None:
            raw_coeff = raw_coeff.index_select(0, rows)
        loss, stats = _ReducedDivergence.apply(*args, coeff.contiguous(), raw_coeff, module, options)
    if not return_stats:
        return loss
    return loss, _scatter_stats(stats, rows, n, counted, options.need_raw_lse)


def _nothing_counted(student_hidden, weight, bias, n, reduction, return_stats, counted, need_raw_lse):
    """No counted token: an exact zero that is still connected to the graph (zero gradients)."""
    anchor = student_hidden.sum() * 0 + weight.sum() * 0
    if bias is not None:
        anchor = anchor + bias.sum() * 0
    anchor = anchor.float().nan_to_num(0.0, 0.0, 0.0)
    loss = anchor.expand(n).clone() if reduction == "none" else anchor
    if not return_stats:
        return loss
    zeros = torch.zeros(n, device=student_hidden.device)
    return loss, TokenStats(divergence=zeros, student_lse=zeros, teacher_lse=zeros, student_entropy=zeros,
                            teacher_entropy=zeros, counted=counted, student_raw_lse=zeros if need_raw_lse else None)


def _scatter_stats(stats, rows, n, counted, need_raw_lse):
    def scatter(values):
        return values if rows is None else values.new_zeros(n).index_copy(0, rows, values)

    return TokenStats(
        divergence=scatter(stats[:, LOSS].clamp_min(0.0)),
        student_lse=scatter(_split_lse(stats, STUDENT_MAX, STUDENT_LOG_Z)),
        teacher_lse=scatter(_split_lse(stats, TEACHER_MAX, TEACHER_LOG_Z)),
        student_entropy=scatter(stats[:, STUDENT_ENTROPY]),
        teacher_entropy=scatter(stats[:, TEACHER_ENTROPY]),
        counted=counted,
        student_raw_lse=scatter(_raw_lse(stats)) if need_raw_lse else None,
    )


def fused_linear_reverse_kl(student_hidden, teacher_hidden, lm_head_weight, teacher_lm_head_weight=None, **kwargs):
    """KL(student || teacher) per token, from hidden states: CRISP's loss.
    Same keywords as `fused_linear_divergence` except `divergence` and `beta`."""
    for key in ("divergence", "beta"):
        if key in kwargs:
            raise TypeError(f"fused_linear_reverse_kl() does not take {key!r}; use fused_linear_divergence")
    return fused_linear_divergence(student_hidden, teacher_hidden, lm_head_weight, teacher_lm_head_weight, **kwargs)


__all__ = ["fused_linear_divergence", "fused_linear_reverse_kl", "TokenStats", "available_backends",
           "backend_module", "GRAD_SHIFT"]
