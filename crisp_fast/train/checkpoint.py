"""Sharded, atomic, verified checkpoints (torch.distributed.checkpoint) and Hugging Face export.

OUT/checkpoints/step_00000010/
    .metadata, __<r>_0.distcp   model + optimizer + teacher snapshot (DCP, each rank its shards)
    trainer_rank<r>.json        step, data position, teacher refreshes, Python RNG, the trainer's
                                own state (LR scheduler, best validation score): plain JSON
    rng_rank<r>.safetensors     torch (and CUDA) RNG states: tensors, no pickle
    manifest.json               size and sha256 of every file above; written last, atomically

A save writes into `step_XXXXXXXX.partial`, then the manifest, then renames the folder: a kill at
any moment leaves either no `step_X` or a complete one. Before a load every file is checked
against the manifest (ranks share the hashing), so a truncated or bit-flipped file is reported,
naming the checkpoint and the file, instead of being loaded. Nothing of ours is a pickle; DCP's
own `.metadata` is (see docs/train.md, "What a checkpoint trusts").
"""
from __future__ import annotations

import hashlib
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

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "crisp-fast checkpoint v1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it (and the file at fault)."""


def _barrier():
    if is_distributed():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _world() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _gather(value) -> list:
    """Every rank's `value`, in rank order (just [value] without a process group)."""
    if not is_distributed():
        return [value]
    values = [None] * _world()
    dist.all_gather_object(values, value)
    return values


def step_of(path: Path) -> int:
    return int(path.name.split("_")[1].split(".")[0])


def checkpoint_dirs(root: Path) -> list[Path]:
    """Every committed `step_X` folder (not `.partial`), oldest first, verified or not."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".partial")
             and p.name.split("_")[1].isdigit()]
    return sorted(found, key=step_of)


def complete_checkpoints(root: Path) -> list[Path]:
    """The committed checkpoints that have a manifest, oldest first (use `verify` before loading)."""
    return [p for p in checkpoint_dirs(root) if (p / MANIFEST).is_file()]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


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


def _python_rng_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_rng_from_json(state) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss


def save(root: Path, step: int, model, optimizer, teacher, data_position: int, keep: int,
         trainer_state: dict | None = None) -> Path:
    """Write checkpoint `step` under `root` (keeping the newest `keep`); returns its folder.
    `trainer_state` is any JSON-able state of the caller's (scheduler, best score, ...)."""
    from safetensors.torch import save_file

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
    rank = _rank()
    (partial / f"trainer_rank{rank}.json").write_text(json.dumps({
        "step": step, "data_position": data_position, "teacher_refreshes": list(teacher.refreshes),
        "python_rng": _python_rng_json(random.getstate()), "trainer": trainer_state or {}}))
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(partial / f"rng_rank{rank}.safetensors"))
    _barrier()
    # every rank hashes its share of the files; rank 0 writes the manifest, last, then commits
    names = sorted(p.name for p in partial.iterdir() if p.is_file())
    mine = {name: {"bytes": (partial / name).stat().st_size, "sha256": _sha256(partial / name)}
            for name in names[rank::_world()]}
    files = {name: entry for share in _gather(mine) for name, entry in share.items()}
    if rank == 0:
        _write_atomic(partial / MANIFEST, json.dumps({"format": MANIFEST_FORMAT, "step": step, "world_size": _world(),
                                                      "files": dict(sorted(files.items()))}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)  # the commit point
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _verify_files(path: Path, manifest: dict, names: list[str]) -> str | None:
    for name in names:
        entry, file = manifest["files"][name], path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != entry["bytes"]:
            return f"{name} is {size} bytes, the manifest says {entry['bytes']} (truncated or rewritten)"
        if _sha256(file) != entry["sha256"]:
            return f"{name} does not match its sha256 in the manifest (corrupted)"
    return None


def verify(path: Path) -> str | None:
    """None when checkpoint `path` is complete and every file matches its manifest, else what is
    wrong with it (a sentence naming the checkpoint and the file). Collective under torchrun."""
    path = Path(path)
    problem = None
    manifest = None
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
            problem = f"{MANIFEST} is not a crisp-fast manifest"
    except FileNotFoundError:
        problem = f"no {MANIFEST} (incomplete, or written before checkpoints had manifests)"
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
        problem = f"{MANIFEST} is unreadable ({error})"
    if problem is None and manifest.get("world_size") != _world():
        problem = f"it was written by {manifest.get('world_size')} ranks, this run has {_world()}"
    if problem is None:
        names = sorted(manifest["files"])
        problem = _verify_files(path, manifest, names[_rank()::_world()])
    problems = [p for p in _gather(problem) if p]
    return f"checkpoint {path}: {problems[0]}" if problems else None


def load(path: Path, model, optimizer, teacher, *, verified: bool = False) -> dict:
    """Restore everything saved by `save` after verifying it (unless the caller just did:
    `verified`); returns the trainer's JSON state (step, data_position, teacher_refreshes,
    trainer). Raises CheckpointError naming `path`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    problem = None if verified else verify(path)
    if problem:
        raise CheckpointError(problem)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state, "teacher": _teacher_state(teacher)}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as error:  # DCP wraps per-rank failures in its own exception types
        raise CheckpointError(f"checkpoint {path}: the sharded state does not load into this model "
                              f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from error
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for saved, loaded in zip(teacher.snapshot or [], state["teacher"].values()):
        local = loaded.to_local() if hasattr(loaded, "to_local") else loaded
        if local.data_ptr() != saved.data_ptr():
            saved.copy_(local)
    rank = _rank()
    try:
        extra = json.loads((path / f"trainer_rank{rank}.json").read_text())
        rng = load_file(str(path / f"rng_rank{rank}.safetensors"))
    except (OSError, json.JSONDecodeError, SafetensorError) as error:
        raise CheckpointError(f"checkpoint {path}: rank {rank}'s trainer state is unreadable ({error})") from error
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    random.setstate(_python_rng_from_json(extra["python_rng"]))
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
