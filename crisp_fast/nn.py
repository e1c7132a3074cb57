"""nn.Module wrappers of the fused loss, including a drop-in for Liger's `LigerFusedLinearJSD`."""
from __future__ import annotations

import torch

from crisp_fast.loss import fused_linear_divergence


class FusedLinearDivergence(torch.nn.Module):
    """`fused_linear_divergence` as a module; the constructor keywords are the loss options."""

    def __init__(self, divergence: str = "reverse_kl", beta: float = 1.0, *, temperature: float = 1.0,
                 reduction: str = "mean", backend: str = "auto", **options):
        super().__init__()
        self.options = dict(divergence=divergence, beta=beta, temperature=temperature, reduction=reduction,
                            backend=backend, **options)

    def forward(self, student_hidden, teacher_hidden, lm_head_weight, teacher_lm_head_weight=None, **kwargs):
        return fused_linear_divergence(student_hidden, teacher_hidden, lm_head_weight, teacher_lm_head_weight,
                                       **{**self.options, **kwargs})

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())


class FusedLinearReverseKL(FusedLinearDivergence):
    """KL(student || teacher) from hidden states (CRISP's loss) as a module."""

    def __init__(self, *, temperature: float = 1.0, reduction: str = "mean", backend: str = "auto", **options):
        super().__init__("reverse_kl", 1.0, temperature=temperature, reduction=reduction, backend=backend, **options)


class FusedLinearJSD(torch.nn.Module):
    """Drop-in for `liger_kernel.transformers.LigerFusedLinearJSD`: same constructor and call.

    forward(student_input [BT, H], student_weight [V, H], teacher_input [BT, H'],
            teacher_weight [V, H'], shift_labels [BT] | None) -> the generalized JSD(jsd_beta)
    averaged over the tokens whose label is not `ignore_index` (all tokens without labels).
    """

    def __init__(self, jsd_beta: float = 0.5, ignore_index: int = -100, temperature: float = 1.0,
                 accum_dtype: torch.dtype | None = None, backend: str = "auto"):
        # accum_dtype is accepted for Liger compatibility: the weight gradient is always accumulated in fp32
        super().__init__()
        if not 0.0 <= jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must be in [0, 1], got {jsd_beta}")
        if temperature == 0:
            raise ValueError("temperature cannot be 0")
        self.jsd_beta, self.ignore_index, self.temperature, self.backend = jsd_beta, ignore_index, temperature, backend

    def forward(self, student_input, student_weight, teacher_input, teacher_weight, shift_labels=None):
        mask = None if shift_labels is None else shift_labels.reshape(-1) != self.ignore_index
        return fused_linear_divergence(student_input, teacher_input, student_weight, teacher_weight, mask=mask,
                                       divergence="jsd", beta=self.jsd_beta, temperature=self.temperature,
                                       reduction="mean", backend=self.backend)
