"""crisp-fast: fused reverse-KL self-distillation (CRISP) from hidden states, and its trainer.

The loss layer imports nothing of the trainer, so other trainers can lift it alone:

    from crisp_fast import fused_linear_reverse_kl
    loss = fused_linear_reverse_kl(student_hidden, teacher_hidden, lm_head.weight, mask=mask)
"""
from crisp_fast.loss import TokenStats, available_backends, fused_linear_divergence, fused_linear_reverse_kl
from crisp_fast.nn import FusedLinearDivergence, FusedLinearJSD, FusedLinearReverseKL

__version__ = "0.1.0"

__all__ = [
    "fused_linear_reverse_kl",
    "fused_linear_divergence",
    "TokenStats",
    "available_backends",
    "FusedLinearReverseKL",
    "FusedLinearDivergence",
    "FusedLinearJSD",
]
