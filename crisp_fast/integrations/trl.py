"""TRL's `DistillationTrainer` on crisp_fast's fused loss, switched on by one line.

    from crisp_fast.integrations.trl import patch_distillation_trainer

    patch_distillation_trainer()                 # every DistillationTrainer from now on
    with patch_distillation_trainer():           # or only inside the block (undone on exit)
        trainer.train()

TRL 1.16's `DistillationTrainer` computes its loss in one module-level function,
`trl.trainer.distillation_trainer._chunked_divergence_loss`, which it looks up by name at every
step. The patch rebinds that name (and any other `trl.*` module attribute holding the same
function) to `chunked_divergence_loss` below, which takes the same arguments, returns the same
`(loss, entropy_sum, n_valid)` and computes it with `crisp_fast.fused_linear_divergence`:

* `beta` is TRL's generalized JSD (0 = forward KL, 1 = reverse KL), the same convention as ours;
* temperature, per-model `logit_scale` and `final_logit_softcapping` (scale -> softcap -> /T),
  per-model lm_head biases and hidden sizes are passed straight through;
* `num_items_in_batch` given: loss = sum / num_items_in_batch (gradient-accumulation correct);
  absent: loss = sum / max(n_valid, 1), as TRL does;
* FSDP2 DTensor lm_head weights (and biases) are gathered once with `full_tensor()`, as TRL does;
* the compute dtype is TRL's: the autocast dtype when autocast is on, else the hidden states'
  dtype; each weight is cast to it once (TRL casts each vocabulary tile instead);
* `entropy_sum` is the sum over valid tokens of the tempered student entropy, without gradient.

The only difference in value: crisp_fast clamps each token's divergence at 0 (TRL can return
-1e-9 from rounding). Undo with `.undo()` on the returned handle, by leaving the `with` block,
or with `unpatch_distillation_trainer()`.
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable

import torch

from crisp_fast.loss import fused_linear_divergence

_TRL_MODULE = "trl.trainer.distillation_trainer"
_FUNCTION_NAME = "_chunked_divergence_loss"
_MARK = "_crisp_fast_backend"  # set on our replacement functions, so a patch never saves one as "original"

# The TRL function as it was before the first patch, by module name: what a full unpatch restores.
_TRL_ORIGINALS: dict[str, Callable] = {}


def _is_dtensor(value) -> bool:
    if value is None or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def _gathered_head(weight, bias, dtype):
    """An FSDP2 (DTensor) head gathered once with `full_tensor()` (differentiable: its backward is the
    reduce-scatter), the weight cast to `dtype` as TRL does; a plain head is returned as it is."""
    if not _is_dtensor(weight):
        return weight, bias
    return weight.full_tensor().to(dtype), (bias.full_tensor() if _is_dtensor(bias) else bias)


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype TRL projects in: autocast's when autocast is on for the device, else the input's."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def _optional_float(value):
    return None if value is None else float(value)


def chunked_divergence_loss(
    student_hidden_states: torch.Tensor,
    teacher_hidden_states: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
    num_items_in_batch: torch.Tensor | int | None = None,
    student_lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
    temperature: float = 1.0,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's `_chunked_divergence_loss` (same arguments, same returns) computed by crisp_fast.

    Hidden states are `[B, K, H_s]` and `[B, K, H_t]`, the weights `[V, H_s]` and `[V, H_t]`,
    `completion_mask` `[B, K]` (nonzero = counted). Returns the scalar loss (with gradient to the
    student hidden states, weight and bias), the sum of the tempered student entropy over counted
    tokens and the number of counted tokens (an integer tensor), all over the local batch.
    """
    # Gather sharded heads once, and cast to the hidden states' dtype, exactly where TRL does.
    student_lm_head_weight, student_lm_head_bias = _gathered_head(
        student_lm_head_weight, student_lm_head_bias, student_hidden_states.dtype)
    teacher_lm_head_weight, teacher_lm_head_bias = _gathered_head(
        teacher_lm_head_weight, teacher_lm_head_bias, teacher_hidden_states.dtype)

    valid = completion_mask.reshape(-1) != 0
    n_valid = valid.sum()
    shared_head = teacher_lm_head_weight is student_lm_head_weight
    student_dtype, teacher_dtype = _compute_dtype(student_hidden_states), _compute_dtype(teacher_hidden_states)
    student_weight = student_lm_head_weight.to(student_dtype)
    teacher_weight = teacher_lm_head_weight.to(teacher_dtype)
    # A head shared by both models (self-distillation) is passed once, so each weight tile is read once.
    teacher_weight = None if shared_head and student_dtype == teacher_dtype else teacher_weight

    # Autocast off: the inputs already have the compute dtype, and the loss keeps its logits in fp32.
    with torch.autocast(student_hidden_states.device.type, enabled=False):
        loss, stats = fused_linear_divergence(
            student_hidden_states.to(student_dtype),
            teacher_hidden_states.to(teacher_dtype),
            student_weight,
            teacher_weight,
            student_bias=student_lm_head_bias,
            teacher_bias=teacher_lm_head_bias,
            mask=valid,
            temperature=float(temperature),
            reduction="sum",
            divergence="jsd",
            beta=float(beta),
            student_logit_scale=float(student_logit_scale),
            teacher_logit_scale=float(teacher_logit_scale),
            student_softcap=_optional_float(student_final_logit_softcapping),
            teacher_softcap=_optional_float(teacher_final_logit_softcapping),
            backend=backend,
            return_stats=True,
        )
    entropy_sum = stats.student_entropy.sum()
    if num_items_in_batch is None:
        loss = loss / n_valid.clamp(min=1)  # a fully masked rank gives 0, not 0 / 0
    else:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss, entropy_sum, n_valid


def _with_backend(backend: str) -> Callable:
    def crisp_fast_chunked_divergence_loss(*args, **kwargs):
        return chunked_divergence_loss(*args, backend=backend, **kwargs)

    crisp_fast_chunked_divergence_loss.__doc__ = chunked_divergence_loss.__doc__
    setattr(crisp_fast_chunked_divergence_loss, _MARK, backend)
    return crisp_fast_chunked_divergence_loss


def _modules_to_patch():
    """Every loaded `trl` module whose `_chunked_divergence_loss` is TRL's function or one of our patches
    (TRL's trainer module always; any module that re-exported the name too)."""
    trainer_module = importlib.import_module(_TRL_MODULE)
    current = getattr(trainer_module, _FUNCTION_NAME, None)
    if current is None:
        raise RuntimeError(f"{_TRL_MODULE} has no {_FUNCTION_NAME}: this TRL version is not supported "
                           "(crisp_fast.integrations.trl was written against TRL 1.16)")
    original = _TRL_ORIGINALS.get(_TRL_MODULE, current)
    modules = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "trl" or name.startswith("trl.")):
            continue
        value = getattr(module, _FUNCTION_NAME, None)
        if value is not None and (value is original or hasattr(value, _MARK)):
            modules.append(module)
    return modules


class DistillationTrainerPatch:
    """Handle of one patch: `.undo()` (or leaving a `with` block) puts back what it replaced.
    Patches nest: undoing the inner one restores the outer one."""

    def __init__(self, backend: str = "auto"):
        self.backend = backend
        self._replaced: list[tuple[object, Callable]] = []
        replacement = _with_backend(backend)
        for module in _modules_to_patch():
            previous = getattr(module, _FUNCTION_NAME)
            if not hasattr(previous, _MARK):
                _TRL_ORIGINALS.setdefault(module.__name__, previous)
            self._replaced.append((module, previous))
            setattr(module, _FUNCTION_NAME, replacement)

    @property
    def active(self) -> bool:
        return bool(self._replaced)

    def undo(self) -> None:
        for module, previous in reversed(self._replaced):
            setattr(module, _FUNCTION_NAME, previous)
        self._replaced = []

    def __enter__(self) -> "DistillationTrainerPatch":
        return self

    def __exit__(self, *exc_info) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"DistillationTrainerPatch(backend={self.backend!r}, active={self.active})"


def patch_distillation_trainer(backend: str = "auto") -> DistillationTrainerPatch:
    """Make TRL's `DistillationTrainer` compute its loss with crisp_fast (`backend` as in
    `crisp_fast.fused_linear_divergence`). Takes effect at once; returns a handle that undoes it
    (`.undo()`) and is also a context manager (undone when the block exits)."""
    return DistillationTrainerPatch(backend)


def unpatch_distillation_trainer() -> None:
    """Put TRL's own function back everywhere, whatever patches are active."""
    for module in _modules_to_patch():
        original = _TRL_ORIGINALS.get(module.__name__, _TRL_ORIGINALS.get(_TRL_MODULE))
        if original is not None:
            setattr(module, _FUNCTION_NAME, original)


def is_patched() -> bool:
    """True when TRL's `DistillationTrainer` currently computes its loss with crisp_fast."""
    return hasattr(getattr(importlib.import_module(_TRL_MODULE), _FUNCTION_NAME), _MARK)


__all__ = ["chunked_divergence_loss", "patch_distillation_trainer", "unpatch_distillation_trainer",
           "is_patched", "DistillationTrainerPatch"]
