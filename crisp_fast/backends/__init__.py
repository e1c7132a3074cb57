"""Backends compute; `crisp_fast.loss` decides.

`crisp_fast.loss` owns the math contract (validation, masks, token weights, reductions, autograd)
and hands every backend the same narrow problem:

* rows are already compacted to the counted tokens (N >= 1), 2-D and contiguous;
* `student_hidden [N, D]` has the dtype of `weight [V, D]`; `teacher_hidden [N, Dt]` has the dtype
  of `teacher_weight [V, Dt]`; `teacher_weight is None` means the teacher shares `weight`
  (then Dt = D, and a fused backend loads each weight tile once for both sides);
* biases are fp32 `[V]` or None;
* the divergence options are keyword arguments (`DivergenceOptions` below, as plain values).

Each backend module exposes

    is_available() -> tuple[bool, str]           # (usable here?, why not)

    forward(student_hidden, teacher_hidden, weight, teacher_weight, student_bias, teacher_bias,
            **options) -> stats                  # fp32 [N, NUM_STATS], columns below

    backward(student_hidden, teacher_hidden, weight, teacher_weight, student_bias, teacher_bias,
             stats, grad_loss, grad_raw_lse, *, need_grad_hidden, need_grad_weight, need_grad_bias,
             **options) -> (grad_hidden fp32 [N, D] | None, grad_weight fp32 [V, D] | None,
                            grad_bias fp32 [V] | None)

and optionally `forward_backward(... same inputs ..., grad_loss, grad_raw_lse, need_grad_*, **options)
-> (stats, (grad_hidden, grad_weight, grad_bias))` when it can produce the gradients in the same
sweep as the statistics (used for scalar reductions, where the per-token gradient coefficients are
known before the loss is). `grad_loss [N]` is the upstream gradient of each row's divergence,
`grad_raw_lse [N]` (or None) that of column STUDENT_RAW_LSE.

Per-token statistics, fp32 columns of `stats` (the kernels hard-code the same layout):

    LOSS             the divergence of the row (reference.divergence_from_logits)
    STUDENT_LSE      logsumexp(x_s), tempered student logits
    TEACHER_LSE      logsumexp(x_t)
    STUDENT_ENTROPY  H(softmax(x_s))
    GRAD_SHIFT       the per-row constant of the gradient (below); 0 for forward_kl
    STUDENT_RAW_LSE  logsumexp(y_s), untempered capped logits; only filled when need_raw_lse

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

LOSS, STUDENT_LSE, TEACHER_LSE, STUDENT_ENTROPY, GRAD_SHIFT, STUDENT_RAW_LSE = range(6)
NUM_STATS = 6

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")


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
