"""The plain definitions, with every logit materialised: obviously right, memory-hungry.

Tests compare every backend against these (in float64), and readers can take them as the
specification of what `crisp_fast.loss` computes. Nothing here is fast or fused on purpose.

Logit pipeline, per side (student s, teacher t), exactly as TRL and Liger order it:

    z = (hidden @ weight.T + bias) * logit_scale          # raw logits
    y = softcap * tanh(z / softcap)     if softcap else z  # capped logits  (Gemma-style)
    x = y / temperature                                    # tempered logits

Divergences (per token, summed over the vocabulary; P = softmax(x_s), Q = softmax(x_t)):

    reverse_kl : KL(P || Q)                  (CRISP's objective; JSD with beta = 1)
    forward_kl : KL(Q || P)                  (JSD with beta = 0)
    jsd(beta)  : beta * KL(Q || M) + (1 - beta) * KL(P || M),   M = beta * Q + (1 - beta) * P

Also: the entropies H(P) and H(Q) (tempered, for logging) and the log-sum-exp of the student's
*untempered* capped logits y_s (what a hard cross-entropy term needs).

-inf logits (e.g. a -inf bias entry: a banned token) have probability 0 and contribute exactly 0
(the convention 0 log 0 = 0; a product 0 * -inf is never formed). A row whose logits are all -inf
has no distribution: NaN. NaN and +inf propagate.
"""
from __future__ import annotations

import math

import torch

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")


def logits(hidden, weight, bias=None, *, logit_scale=1.0, softcap=None):
    """Capped logits y (before temperature) of one side, in the dtype of the inputs' promotion."""
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def _expected(prob, values):
    """sum_v prob * values with 0 * anything = 0 (so p = 0 where values = -inf contributes 0)."""
    # the masked values are replaced before the product, so autograd never forms 0 * -inf either
    keep = prob > 0
    return torch.where(keep, prob * torch.where(keep, values, torch.zeros_like(values)), torch.zeros_like(values)).sum(-1)


def divergence_from_logits(student_logits, teacher_logits, *, divergence="reverse_kl", beta=1.0, temperature=1.0):
    """Per-row divergence between softmax(student_logits / T) and softmax(teacher_logits / T)."""
    log_p = torch.log_softmax(student_logits / temperature, dim=-1)
    log_q = torch.log_softmax(teacher_logits / temperature, dim=-1)
    if divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"
    if divergence == "reverse_kl":
        return _expected(log_p.exp(), log_p - log_q)
    if divergence == "forward_kl":
        return _expected(log_q.exp(), log_q - log_p)
    if divergence == "jsd":
        # where both are -inf, so is log m; the masked form keeps autograd free of -inf - -inf too
        some = (log_p > -math.inf) | (log_q > -math.inf)
        a, b = (torch.where(some, x, torch.zeros_like(x)) for x in (log_p + math.log(1 - beta), log_q + math.log(beta)))
        log_m = torch.where(some, torch.logaddexp(a, b), torch.full_like(a, -math.inf))
        kl_q_m = _expected(log_q.exp(), log_q - log_m)
        kl_p_m = _expected(log_p.exp(), log_p - log_m)
        return beta * kl_q_m + (1 - beta) * kl_p_m
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")


def fused_linear_divergence(
    student_hidden,
    teacher_hidden,
    lm_head_weight,
    teacher_lm_head_weight=None,
    *,
    student_bias=None,
    teacher_bias=None,
    mask=None,
    token_weights=None,
    temperature=1.0,
    reduction="mean",
    divergence="reverse_kl",
    beta=1.0,
    student_logit_scale=1.0,
    teacher_logit_scale=1.0,
    student_softcap=None,
    teacher_softcap=None,
):
    """Reference for `crisp_fast.fused_linear_divergence`: same arguments, same reductions.

    Reductions (`m` = mask as 0/1, `w` = token_weights, 1 when absent):
      "none": m * w * D_i per token;  "sum": sum_i m_i w_i D_i;
      "mean": sum_i m_i D_i / max(sum_i m_i, 1) without weights, and the weighted sum
              sum_i m_i w_i D_i with weights (the weights carry the normalisation).
    The teacher side is detached: it never receives a gradient.
    """
    d = student_hidden.shape[-1]
    hs = student_hidden.reshape(-1, d)
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    wt = (lm_head_weight if teacher_lm_head_weight is None else teacher_lm_head_weight).detach()
    tb = None if teacher_bias is None else teacher_bias.detach()
    ys = logits(hs, lm_head_weight, student_bias, logit_scale=student_logit_scale, softcap=student_softcap)
    yt = logits(ht, wt, tb, logit_scale=teacher_logit_scale, softcap=teacher_softcap)
    per_token = divergence_from_logits(ys, yt, divergence=divergence, beta=beta, temperature=temperature)
    counted = torch.ones_like(per_token) if mask is None else mask.reshape(-1).to(per_token.dtype)
    # where() rather than a product, so a masked-out row's NaN never leaks into the sum
    per_token = torch.where(counted.bool(), per_token, torch.zeros_like(per_token))
    if token_weights is not None:
        per_token = per_token * token_weights.reshape(-1).to(per_token.dtype)
    if reduction == "none":
        return per_token
    if reduction == "sum" or token_weights is not None:
        return per_token.sum()
    if reduction == "mean":
        return per_token.sum() / counted.sum().clamp_min(1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def token_statistics(student_hidden, teacher_hidden, lm_head_weight, teacher_lm_head_weight=None, *,
                     student_bias=None, teacher_bias=None, temperature=1.0,
                     student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None):
    """Per-token logging statistics: student/teacher log-sum-exp of tempered logits, both entropies,
    and the student's log-sum-exp of untempered (capped) logits."""
    d = student_hidden.shape[-1]
    hs = student_hidden.reshape(-1, d)
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    wt = lm_head_weight if teacher_lm_head_weight is None else teacher_lm_head_weight
    ys = logits(hs, lm_head_weight, student_bias, logit_scale=student_logit_scale, softcap=student_softcap)
    yt = logits(ht, wt, teacher_bias, logit_scale=teacher_logit_scale, softcap=teacher_softcap)
    log_p = torch.log_softmax(ys / temperature, dim=-1)
    log_q = torch.log_softmax(yt / temperature, dim=-1)
    return {
        "student_lse": torch.logsumexp(ys / temperature, dim=-1),
        "teacher_lse": torch.logsumexp(yt / temperature, dim=-1),
        "student_entropy": -_expected(log_p.exp(), log_p),
        "teacher_entropy": -_expected(log_q.exp(), log_q),
        "student_raw_lse": torch.logsumexp(ys, dim=-1),
    }
