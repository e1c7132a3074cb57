"""Sharded, atomic checkpoints (torch.distributed.checkpoint) and Hugging Face export.

OUT/checkpoints/step_00000010/   model + optimizer + teacher snapshot (DCP, each rank its shards),
                                 extra_rank<r>.pt (step, data position, RNG states), meta.json
A save writes into `step_XXXXXXXX.partial` and is renamed only when every rank has finished and
meta.json is written, so a kill mid-save leaves the previous checkpoint as the latest complete one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict,
)

from crisp_fast.train.fsdp import is_distributed


def _barrier():
    if is_distributed():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".partial")
             and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def _teacher_state(teacher) -> dict:
    """Snapshot shards as DTensors laid out like their parameters (plain tensors without FSDP)."""
    state = {}
    for (name, parameter), saved in zip(teacher.named_parameters(), teacher.snapshot or []):
        if hasattr(parameter, "device_mesh"):
            from torch.distributed.tensor import DTensor

            saved = DTensor.from_local(saved, parameter.device_mesh, parameter.placements,
                                       shape=parameter.shape, stride=parameter.stride(), run_check=False)
        state[name] = saved
    return state


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(root: Path, step: int, model, optimizer, teacher, data_position: int, keep: int) -> Path:
    root = Path(root)
    final = root / f"step_{step:08d}"
    partial = root / f"step_{step:08d}.partial"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state, "teacher": _teacher_state(teacher)}, checkpoint_id=str(partial))
    torch.save({"step": step, "data_position": data_position, "rng": _rng_state(),
                "teacher_refreshes": list(teacher.refreshes)}, partial / f"extra_rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        (partial / "meta.json").write_text(json.dumps({"step": step, "world_size": dist.get_world_size() if is_distributed() else 1}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)  # the commit point
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load(path: Path, model, optimizer, teacher) -> dict:
    """Restore everything saved by `save`; returns the extra state (step, data_position, ...)."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no meta.json)")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state, "teacher": _teacher_state(teacher)}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for saved, loaded in zip(teacher.snapshot or [], state["teacher"].values()):
        local = loaded.to_local() if hasattr(loaded, "to_local") else loaded
        if local.data_ptr() != saved.data_ptr():
            saved.copy_(local)
    extra_file = path / f"extra_rank{_rank()}.pt"
    if not extra_file.is_file():
        raise FileNotFoundError(f"{extra_file} is missing: was the checkpoint written with a different world size?")
    extra = torch.load(extra_file, weights_only=False)
    _set_rng_state(extra["rng"])
    teacher.refreshes = list(extra.get("teacher_refreshes", []))
    return extra


def export_hf(out_dir: Path, model, tokenizer) -> Path | None:
    """`save_pretrained` safetensors of the current weights (gathered to rank 0's CPU). With LoRA:
    the adapters merged into the base weights in `out_dir` (a plain HF model) and the PEFT adapter
    beside it in `<out_dir>-adapter`."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    path = Path(out_dir)
    if _rank() == 0:
        lm_state = {name.removeprefix("lm."): tensor for name, tensor in state.items()}
        if getattr(model, "peft", None) is not None:
            from crisp_fast.train.lora import export_lora

            export_lora(path, path.with_name(path.name + "-adapter"), model.lm, model.peft, lm_state, tokenizer)
        else:
            path.mkdir(parents=True, exist_ok=True)
            model.lm.save_pretrained(path, state_dict=lm_state, safe_serialization=True)
            tokenizer.save_pretrained(path)
    _barrier()
    return path
