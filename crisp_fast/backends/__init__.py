"""Backends compute; `crisp_fast.loss` decides.

`crisp_fast.loss` owns the math contract (validation, masks, token weights, reductions, autograd)
and hands every backend the same narrow problem:

* rows are already compacted to the counted tokens (N >= 1), 2-D and contiguous;
* `student_hidden [N, D]` has the dtype of `weight [V, D]`; `teacher_hidden [N, Dt]` has the dtype
  of `teacher_weight [V, Dt]`; `teacher_weight is None` means the teacher shares `weight`
  (then Dt = D, and a fused backend loads each weight tile once for both sides);
* biases are fp32 `[V]` or None (entries may be -inf: banned tokens, p = 0 there);
* the divergence options are keyword arguments (`DivergenceOptions` below, as plain values),
  including `deterministic` (bitwise-repeatable gradients: no float atomics).

Every backend module satisfies the `Backend` protocol below (`FusedBackend` when it also has
`forward_backward`, which produces the gradients in the same sweep as the statistics; used for
scalar reductions, where the per-token gradient coefficients are known before the loss is).
`grad_loss [N]` is the upstream gradient of each row's divergence, `grad_raw_lse [N]` (or None)
that of the untempered student log-sum-exp (STUDENT_RAW_MAX + STUDENT_RAW_LOG_Z).
`BACKENDS` maps each name to a loader that imports its module on first use.

Per-token statistics, fp32 columns of `stats` (defined once, in kernels/stats_layout.py, which the
Triton kernels import as constants and csrc/stats_layout.h mirrors):

    LOSS               the divergence of the row (reference.divergence_from_logits), unclamped
    STUDENT_MAX        m_s = max_v x_s, tempered student logits (exact: a max rounds nothing)
    STUDENT_LOG_Z      log sum_v exp(x_s - m_s)          (logsumexp(x_s) = m_s + log Z_s)
    TEACHER_MAX        m_t = max_v x_t
    TEACHER_LOG_Z      log sum_v exp(x_t - m_t)
    STUDENT_ENTROPY    H(softmax(x_s)), nats
    TEACHER_ENTROPY    H(softmax(x_t)), nats
    GRAD_SHIFT         the per-row constant of the gradient (below); 0 for forward_kl
    STUDENT_RAW_MAX    max of the untempered capped logits y_s; only when need_raw_lse, else 0
    STUDENT_RAW_LOG_Z  log sum_v exp(y_s - STUDENT_RAW_MAX); only when need_raw_lse, else 0
    GRAD_SHIFT_LO      GRAD_SHIFT - fp32(GRAD_SHIFT): the shift is a sum of the two columns, since
                       a KL of ~40 rounded to fp32 (ulp 4e-6) alone would tilt every gradient row
                       by p * 2e-6 / T in the direction of E_p[W]

Why split: a log-sum-exp of logits ~1e4 rounded to fp32 is off by ~1e-3, and p = exp(x - lse) then
does not sum to 1. Every probability and log-ratio is formed from max-shifted logits instead:

    log p = (x_s - m_s) - log Z_s,    log p - log q = ((x_s - m_s) - (x_t - m_t)) - (log Z_s - log Z_t)

A row whose logits are all -inf has max -inf and gives NaN (by contract); other -inf entries give
p = 0 exactly and finite results (products 0 * -inf are never formed). NaN and +inf propagate.

Gradient with respect to the tempered student logits x_s (p = softmax(x_s), q = softmax(x_t)):

    reverse_kl : p * (log p - log q - KL(p||q))          GRAD_SHIFT = KL(p||q)
    forward_kl : p - q
    jsd(beta)  : (1-beta) * p * (log p - log m - KL(p||m)),  m = beta q + (1-beta) p,
                                                          GRAD_SHIFT = KL(p||m)

and then, back to the pre-activation a = h W^T + b:  dL/dy = grad_loss * g / T + grad_raw_lse * softmax(y),
dL/da = dL/dy * scale * (1 - tanh^2(z / cap)) (the last factor only with a softcap).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Callable, Protocol, runtime_checkable

if TYPE_CHECKING:  # not at runtime: the name `torch` in this package is the torch backend module
    import torch

try:
    from crisp_fast.kernels.stats_layout import *  # noqa: F401,F403 - the one definition of the layout
    from crisp_fast.kernels.stats_layout import NUM_STATS
except ImportError:  # an uninstalled checkout: kernels/ is a top-level folder
    from kernels.stats_layout import *  # noqa: F401,F403
    from kernels.stats_layout import NUM_STATS

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
STATS_COLUMNS = ("LOSS", "STUDENT_MAX", "STUDENT_LOG_Z", "TEACHER_MAX", "TEACHER_LOG_Z", "STUDENT_ENTROPY",
                 "TEACHER_ENTROPY", "GRAD_SHIFT", "STUDENT_RAW_MAX", "STUDENT_RAW_LOG_Z",
                 "GRAD_SHIFT_LO")
assert len(STATS_COLUMNS) == NUM_STATS


def stats_layout() -> dict[str, int]:
    """{column name: index}, as the native extension exports it (compared at its import)."""
    return {name: globals()[name] for name in STATS_COLUMNS + ("NUM_STATS",)}


@dataclass(frozen=True)
class DivergenceOptions:
    """The options every backend receives, as keyword arguments (`dataclasses.asdict`)."""

    divergence: str = "reverse_kl"
    beta: float = 1.0
    temperature: float = 1.0
    student_scale: float = 1.0
    teacher_scale: float = 1.0
    student_softcap: float | None = None
    teacher_softcap: float | None = None
    need_raw_lse: bool = False
    deterministic: bool = False
    # scratch a CPU backend may hold beyond its outputs (its logits chunks); None:
    # DEFAULT_WORKSPACE_SHARE of the irreducible gradients (dW + dh). The Triton backend's tiles
    # live on chip: it ignores this.
    workspace_bytes: int | None = None


# The default CPU scratch as a share of the fp32 dW + dh, so outputs + scratch stay under 1.5x them
# (csrc/fused_divergence.cpp mirrors it as kScratchShareOfGradients).
DEFAULT_WORKSPACE_SHARE = 0.4


Grads = "tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]"


@runtime_checkable
class Backend(Protocol):
    """What `crisp_fast.loss` calls. Options are the `DivergenceOptions` fields as keywords."""

    def is_available(self) -> tuple[bool, str]:
        """(usable here?, why not)."""

    def forward(self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, weight: torch.Tensor,
                teacher_weight: torch.Tensor | None, student_bias: torch.Tensor | None,
                teacher_bias: torch.Tensor | None, **options) -> torch.Tensor:
        """fp32 stats [N, NUM_STATS]."""

    def backward(self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, weight: torch.Tensor,
                 teacher_weight: torch.Tensor | None, student_bias: torch.Tensor | None,
                 teacher_bias: torch.Tensor | None, stats: torch.Tensor, grad_loss: torch.Tensor,
                 grad_raw_lse: torch.Tensor | None, *, need_grad_hidden: bool, need_grad_weight: bool,
                 need_grad_bias: bool, **options) -> Grads:
        """(grad_hidden fp32 [N, D] | None, grad_weight fp32 [V, D] | None, grad_bias fp32 [V] | None);
        a gradient that is not needed is None and its GEMM is skipped."""


@runtime_checkable
class FusedBackend(Backend, Protocol):
    """A backend that also computes statistics and gradients in one sweep (4 GEMMs)."""

    def forward_backward(self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, weight: torch.Tensor,
                         teacher_weight: torch.Tensor | None, student_bias: torch.Tensor | None,
                         teacher_bias: torch.Tensor | None, grad_loss: torch.Tensor,
                         grad_raw_lse: torch.Tensor | None, *, need_grad_hidden: bool, need_grad_weight: bool,
                         need_grad_bias: bool, **options) -> tuple[torch.Tensor, Grads]:
        """(stats, grads), as forward and backward would give."""


def _load_torch() -> ModuleType:
    from crisp_fast.backends import torch as module
    return module


def _load_native() -> ModuleType:
    from crisp_fast.backends import native as module
    return module


def _load_triton() -> ModuleType:
    from crisp_fast.backends import triton as module
    return module


# name -> loader; a module is imported only when its backend is first asked for
BACKENDS: dict[str, Callable[[], Backend]] = {"torch": _load_torch, "native": _load_native, "triton": _load_triton}


def load_backend(name: str) -> Backend:
    """The module of backend `name` (ValueError for an unknown name; ImportError if it cannot import)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {tuple(BACKENDS)}, got {name!r}")
    return BACKENDS[name]()
