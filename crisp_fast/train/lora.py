"""LoRA through the `peft` library: the student is the base model plus adapters, the frozen
teacher (M = 0) is the same module with the adapters disabled.

`apply_lora(lm, settings)` injects the adapters into the HF model *in place* (peft's
`get_peft_model`) and returns the `PeftModel` handle. The trainer keeps training the inner HF
model (generation, FSDP wrapping and the loss see an ordinary causal LM whose linear layers carry
adapters); the handle is used only for `disable_adapter()` (the base-model teacher) and for export.

Everything but the adapter matrices is frozen, the lm_head included: both contexts then share one
head tensor, so the fused loss takes its shared-weight path and, with `lm_head.weight.requires_grad`
False, skips the weight-gradient GEMM.
"""
from __future__ import annotations

from pathlib import Path

import torch


def decoder_linear_names(lm) -> list[str]:
    """The distinct last-component names of every nn.Linear inside the decoder (never the lm_head,
    which lives outside it), in first-seen order: peft matches target modules by these suffixes."""
    names: list[str] = []
    for name, module in lm.get_decoder().named_modules():
        if isinstance(module, torch.nn.Linear):
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in names:
                names.append(leaf)
    return names


def resolve_targets(lm, requested) -> list[str]:
    """`requested` (config `model.lora.target_modules`, () = all decoder linears), checked against
    the model: an unknown name or the lm_head is an error naming the modules that exist."""
    available = decoder_linear_names(lm)
    if not available:
        raise ValueError(f"{type(lm).__name__}: no nn.Linear layer in the decoder for LoRA to adapt")
    targets = list(requested) or available
    head_name = _head_name(lm)
    if head_name in targets:
        raise ValueError(f"model.lora.target_modules must not include the lm_head ({head_name!r}): it stays frozen so "
                         "that student and teacher share one head; decoder linear layers: " + ", ".join(available))
    missing = [t for t in targets if t not in available]
    if missing:
        raise ValueError(f"model.lora.target_modules: {', '.join(map(repr, missing))} not in {type(lm).__name__}'s "
                         f"decoder; its linear layers are: {', '.join(available)}")
    return targets


def _head_name(lm) -> str:
    head = lm.get_output_embeddings()
    return next((name for name, module in lm.named_modules() if module is head), "lm_head")


def peft_config(lm, settings):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                          target_modules=resolve_targets(lm, settings.target_modules), bias="none")


def apply_lora(lm, settings):
    """Inject adapters into `lm` in place and freeze every other parameter; returns the PeftModel.
    Adapters are kept in fp32 even on a bf16 base (peft's autocast_adapter_dtype)."""
    from peft import get_peft_model

    config = peft_config(lm, settings)
    peft_model = get_peft_model(lm, config, autocast_adapter_dtype=True)
    head = lm.get_output_embeddings()
    for parameter in head.parameters():  # peft freezes it already; the shared-head path depends on it
        parameter.requires_grad_(False)
    return peft_model


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters of the whole model: global element counts, so the same on
    every rank under FSDP (a DTensor's numel is that of the full tensor)."""
    trainable = total = 0
    for parameter in model.parameters():
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return trainable, total


def export_lora(out_dir: Path, adapter_dir: Path, lm, peft_handle, lm_state: dict, tokenizer) -> None:
    """Rank 0: write the merged model (HF safetensors, loads with plain transformers) to `out_dir`
    and the PEFT adapter (adapter_config.json + adapter_model.safetensors) to `adapter_dir`.

    `lm_state` is the gathered full state dict of the trained inner model (adapter layers
    included). A second, empty (meta-device) model with the same adapters is given those tensors
    by reference, peft saves its adapter and merges it into a plain model, out of place: the live
    (possibly sharded) model is not touched. Extra host memory: the merged adapted weights."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    config = peft_handle.peft_config["default"]
    with torch.device("meta"):
        copy = AutoModelForCausalLM.from_config(lm.config, dtype=lm.dtype)
    copy_peft = get_peft_model(copy, config, autocast_adapter_dtype=False)
    inner = copy_peft.get_base_model()
    missing, unexpected = inner.load_state_dict(lm_state, strict=False, assign=True)
    missing = [name for name in missing if not _is_tied(inner, name)]
    if missing or unexpected:
        raise RuntimeError(f"LoRA export: state dict does not match the model (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")
    if getattr(lm.config, "tie_word_embeddings", False):
        inner.tie_weights()
    adapter_dir.mkdir(parents=True, exist_ok=True)
    copy_peft.save_pretrained(adapter_dir, safe_serialization=True)
    # safe_merge forms each merged weight out of place (and checks it is finite): in one process
    # `lm_state` holds the live parameters themselves, which an in-place merge would overwrite
    merged = copy_peft.merge_and_unload(safe_merge=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    tokenizer.save_pretrained(adapter_dir)


def _is_tied(model, name: str) -> bool:
    return name.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)
