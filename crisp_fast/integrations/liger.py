"""A drop-in for Liger's chunked `LigerFusedLinearJSDLoss`, computed by crisp_fast's fused loss.

    # before: from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    from crisp_fast.integrations.liger import FusedLinearJSDLoss as LigerFusedLinearJSDLoss

Same constructor keywords (weight_hard_loss, weight_soft_loss, beta, ignore_index, temperature,
compiled, chunk_size, return_soft_hard_loss), same forward keywords (student_input,
student_weight, teacher_input, teacher_weight, true_labels, student_bias, teacher_bias), same
values as liger-kernel 0.8.5:

    n     = max(#{i : true_labels_i != ignore_index}, 1)
    soft  = sum over counted i of JSD_beta(softmax(x_s,i / T) , softmax(x_t,i / T)) / n
    hard  = sum over counted i of CE(x_s,i, true_labels_i) / n      (untempered logits)
    loss  = weight_hard_loss * hard + weight_soft_loss * soft

with x = h W^T + b for each side (beta = 0 forward KL, 1 reverse KL; M = beta Q + (1 - beta) P).
A teacher vocabulary larger than the student's is handled as Liger does: the student's logits are
padded with zeros for the soft loss (here by zero rows of the weight; the hard loss then takes a
second sweep, over the student's own vocabulary).

How: one call of `crisp_fast.fused_linear_divergence` with the soft weights as `token_weights`
and the hard loss's log-sum-exp as `_raw_lse_coeff`, so both terms come from one sweep over the
vocabulary; the label logit of the cross-entropy (CE_i = lse_i - x_s,i[label_i]) is a gather of
`true_labels` rows of the weight, with ordinary autograd. `compiled` and `chunk_size` are accepted
and ignored: the fused loss chooses its own tiling, and never materialises `chunk x V` logits.

Unlike Liger, the logits are in fp32 for bf16/fp16 inputs (Liger's soft loss works on bf16 logits),
so bf16 results agree with Liger to Liger's rounding, and with the fp64 truth more closely.
As in Liger, the extra `soft_loss` and `hard_loss` returned with `return_soft_hard_loss=True` are
for logging and carry no gradient.
"""
from __future__ import annotations

import torch

from crisp_fast.loss import fused_linear_divergence


class FusedLinearJSDLoss(torch.nn.Module):
    """Weighted hard cross-entropy + soft generalized JSD from hidden states (Liger's chunked API)."""

    def __init__(
        self,
        weight_hard_loss: float = 0.5,
        weight_soft_loss: float = 0.5,
        beta: float = 0.5,
        ignore_index: int = -100,
        temperature: float = 1.0,
        compiled: bool = True,
        chunk_size: int = 1024,
        return_soft_hard_loss: bool = False,
        *,
        backend: str = "auto",
    ):
        super().__init__()
        if temperature == 0:
            raise ValueError("temperature cannot be 0")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self.weight_hard_loss = float(weight_hard_loss)
        self.weight_soft_loss = float(weight_soft_loss)
        self.beta = float(beta)
        self.ignore_index = ignore_index
        self.temperature = float(temperature)
        self.compiled = compiled      # accepted for compatibility; the fused loss needs no torch.compile
        self.chunk_size = chunk_size  # accepted for compatibility; the fused loss picks its own tiles
        self.return_soft_hard_loss = return_soft_hard_loss
        self.backend = backend

    def forward(
        self,
        student_input: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_input: torch.Tensor,
        teacher_weight: torch.Tensor,
        true_labels: torch.Tensor | None,
        student_bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
    ):
        d_student, d_teacher = student_input.shape[-1], teacher_input.shape[-1]
        student_input = student_input.reshape(-1, d_student)
        teacher_input = teacher_input.reshape(-1, d_teacher)
        n_tokens = student_input.shape[0]
        computes_hard = self.weight_hard_loss != 0 or self.return_soft_hard_loss
        labels, counted = self._labels_and_mask(true_labels, n_tokens, student_weight.shape[0], computes_hard,
                                                student_input.device)
        padded_weight, padded_bias = self._pad_student_vocab(student_weight, student_bias, teacher_weight)
        padded = padded_weight is not student_weight

        n_counted = counted.sum().clamp_min(1).float()
        soft_coeff = (self.weight_soft_loss / n_counted).expand(n_tokens)
        hard_coeff = (self.weight_hard_loss / n_counted).expand(n_tokens) if computes_hard else None
        # one sweep: sum_i soft_coeff D_i + sum_i hard_coeff lse_i (the hard loss's log-sum-exp part)
        total, stats = fused_linear_divergence(
            student_input, teacher_input, padded_weight, teacher_weight,
            student_bias=padded_bias, teacher_bias=teacher_bias, mask=counted, token_weights=soft_coeff,
            temperature=self.temperature, reduction="sum", divergence="jsd", beta=self.beta,
            backend=self.backend, return_stats=True, _raw_lse_coeff=None if padded else hard_coeff)
        if computes_hard and padded:
            # the cross-entropy's log-sum-exp runs over the student's own vocabulary, not the padding
            total = total + self._lse_sum(student_input, student_weight, student_bias, counted, hard_coeff)
        if not computes_hard:
            loss = total
            hard_loss = total.new_zeros(())
        else:
            label_logit_sum = self._label_logit_sum(student_input, student_weight, student_bias, labels, counted)
            loss = total - self.weight_hard_loss * label_logit_sum / n_counted
        if not self.return_soft_hard_loss:
            return loss
        with torch.no_grad():
            soft_loss = stats.divergence.sum() / n_counted
            if computes_hard:
                hard_loss = self._hard_loss_value(total, soft_loss, label_logit_sum, n_counted, student_input,
                                                  student_weight, student_bias, counted)
        return loss, soft_loss, hard_loss

    def _lse_sum(self, student_input, student_weight, student_bias, counted, coeff):
        """sum_i coeff_i logsumexp(untempered student logits_i) over counted rows, with its gradient: a
        divergence of weight 0 against the student itself carries the `_raw_lse_coeff` term."""
        return fused_linear_divergence(
            student_input, student_input.detach(), student_weight, None, student_bias=student_bias,
            teacher_bias=None if student_bias is None else student_bias.detach(), mask=counted,
            token_weights=torch.zeros(counted.numel(), device=student_input.device), temperature=self.temperature,
            reduction="sum", backend=self.backend, _raw_lse_coeff=coeff)

    # ----------------------------------------------------------------------------------------
    def _labels_and_mask(self, true_labels, n_tokens, vocab, computes_hard, device):
        if true_labels is None:
            if computes_hard:
                raise ValueError("true_labels is None but the hard loss is needed (weight_hard_loss != 0 or "
                                 "return_soft_hard_loss=True); pass the labels, or weight_hard_loss=0")
            return None, torch.ones(n_tokens, dtype=torch.bool, device=device)
        if not isinstance(true_labels, torch.Tensor) or true_labels.is_floating_point():
            raise TypeError(f"true_labels must be an integer tensor, got "
                            f"{getattr(true_labels, 'dtype', type(true_labels).__name__)}")
        labels = true_labels.reshape(-1)
        if labels.numel() != n_tokens:
            raise ValueError(f"true_labels has {labels.numel()} elements but there are {n_tokens} tokens")
        counted = labels != self.ignore_index
        if computes_hard:
            bad = counted & ((labels < 0) | (labels >= vocab))
            if bad.any():
                raise ValueError(f"true_labels holds {labels[bad][0].item()}, outside [0, {vocab}) "
                                 f"and not ignore_index={self.ignore_index}")
        return labels, counted

    @staticmethod
    def _pad_student_vocab(student_weight, student_bias, teacher_weight):
        """Liger pads a smaller student vocabulary's logits with zeros; zero weight rows (and bias
        entries) give exactly those logits, and their gradient is dropped by the slice's backward."""
        extra = teacher_weight.shape[0] - student_weight.shape[0]
        if extra < 0:
            raise ValueError(f"student_weight has vocabulary {student_weight.shape[0]}, larger than "
                             f"teacher_weight's {teacher_weight.shape[0]}")
        if extra == 0:
            return student_weight, student_bias
        student_weight = torch.cat([student_weight, student_weight.new_zeros(extra, student_weight.shape[1])])
        if student_bias is not None:
            student_bias = torch.cat([student_bias, student_bias.new_zeros(extra)])
        return student_weight, student_bias

    @staticmethod
    def _label_logit_sum(student_input, student_weight, student_bias, labels, counted):
        """sum over counted tokens of the untempered student logit of the label, in fp32, with autograd."""
        rows = counted.nonzero().squeeze(1)
        label_ids = labels.index_select(0, rows)
        hidden = student_input.index_select(0, rows).float()
        label_rows = student_weight.index_select(0, label_ids).float()
        logit = (hidden * label_rows).sum(-1)
        if student_bias is not None:
            logit = logit + student_bias.index_select(0, label_ids).float()
        return logit.sum()

    def _hard_loss_value(self, total, soft_loss, label_logit_sum, n_counted, student_input, student_weight,
                         student_bias, counted):
        """The unweighted hard loss for logging. When its weight is large enough, it is what the
        combined sum holds besides the soft part; otherwise (weight 0 or tiny, where dividing by it
        would amplify rounding) one extra no-grad sweep computes the log-sum-exp sum directly."""
        if abs(self.weight_hard_loss) >= 1e-2 * max(abs(self.weight_soft_loss), 1e-30):
            lse_sum = (total.detach() - self.weight_soft_loss * soft_loss) * n_counted / self.weight_hard_loss
        else:
            lse_sum = self._lse_sum(student_input.detach(), student_weight.detach(),
                                    None if student_bias is None else student_bias.detach(), counted,
                                    torch.ones(counted.numel(), device=student_input.device))
        return (lse_sum - label_logit_sum.detach()) / n_counted

    def extra_repr(self) -> str:
        return (f"weight_hard_loss={self.weight_hard_loss}, weight_soft_loss={self.weight_soft_loss}, "
                f"beta={self.beta}, ignore_index={self.ignore_index}, temperature={self.temperature}, "
                f"backend={self.backend!r}")


__all__ = ["FusedLinearJSDLoss"]
