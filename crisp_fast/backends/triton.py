"""Triton backend: a thin adapter from the backend protocol (crisp_fast.backends) to the launchers
in `crisp_fast.kernels` (the top-level kernels/ folder of the repository).

Runs on CUDA tensors, or on CPU tensors through the Triton interpreter when TRITON_INTERPRET=1 was
set before triton was imported (slow; tests only). The launchers pick their tiles: sm_90-checked
tiles on the GPU, large interpreter-friendly blocks when interpreting.
"""
from __future__ import annotations

import os


def _launchers():
    try:
        from crisp_fast.kernels import divergence_backward, divergence_forward
    except ImportError:  # an uninstalled checkout: kernels/ is a top-level folder
        from kernels import divergence_backward, divergence_forward
    return divergence_forward, divergence_backward


def is_available() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return False, f"triton is not importable: {error}"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "ok (Triton interpreter)"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run on CPU)"
    return True, "ok"


def forward(student_hidden, teacher_hidden, weight, teacher_weight, student_bias, teacher_bias, *,
            workspace_bytes=None, **options):
    # workspace_bytes is for the CPU backends' chunks: the kernels' tiles are on chip
    fwd, _ = _launchers()
    return fwd.divergence_forward(student_hidden, teacher_hidden, weight, teacher_weight, student_bias,
                                  teacher_bias, **options)


def backward(student_hidden, teacher_hidden, weight, teacher_weight, student_bias, teacher_bias, stats,
             grad_loss, grad_raw_lse, *, need_grad_hidden, need_grad_weight, need_grad_bias, deterministic=False,
             workspace_bytes=None, **options):
    import torch

    _, bwd = _launchers()
    deterministic = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
    return bwd.divergence_backward(student_hidden, teacher_hidden, weight, teacher_weight, student_bias,
                                   teacher_bias, stats, grad_loss, grad_raw_lse, need_grad_hidden=need_grad_hidden,
                                   need_grad_weight=need_grad_weight, need_grad_bias=need_grad_bias,
                                   deterministic=deterministic, **options)
