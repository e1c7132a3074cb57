"""The teacher as a snapshot of the student's *sharded* trainable parameters, swapped in for the
no-grad teacher pass and swapped out again — no second model, no second FSDP wrapper, no full gather.

Only parameters that require grad are snapshotted: a frozen one never changes, so the live tensor
*is* the teacher's (with LoRA the snapshot holds the adapter tensors only, and a frozen lm_head is
shared by both sides).

M = teacher_refresh_every, a = teacher_ema:
  M = 1  the teacher is the live student: no snapshot, no swap, no extra memory.
  M = 0  the snapshot is the initial weights, never refreshed. With LoRA: no snapshot at all, the
         teacher is the same module with its adapters disabled (peft's `disable_adapter`), i.e.
         the base model.
  M > 1  the snapshot is refreshed (a local copy_, no communication) after optimizer steps
         M, 2M, 3M, ...: steps kM+1 .. (k+1)M are scored by the weights at the end of step kM.
  a > 0  instead of the hard refresh, after *every* step snapshot <- snapshot + a (student -
         snapshot) (a = 1: the teacher lags the student by one step). M is then not used, except
         that M = 1 (no snapshot to average) is refused by the config.

Cost (P = local shard elements of the trainable parameters on this rank):
  memory  the snapshot: P * bytes(snapshot dtype), on the configured device (CPU: host memory).
          A swap exchanges the contents of the snapshot and the local shards through a 16 MiB
          buffer (the snapshot holds the student during the teacher pass), so it costs nothing
          model-sized; only a snapshot in another dtype than the parameters (teacher_snapshot_dtype)
          needs a stash of the student's shards, P * bytes(param dtype), during the pass.
  time    per teacher pass: six copies of the local shards (three each way; with a stash: three),
          i.e. ~6 * P * bytes over the memory bus (host<->device if the snapshot is on CPU).

The teacher's lm_head for the loss (`head_source`): "shared" when it is the student's tensor
(M = 1, a frozen head, the base-model teacher): the loss's shared-weight path, nothing copied;
"snapshot" when this rank's snapshot holds the whole head (one process): the snapshot tensor is
handed over by reference (cast only if the snapshot dtype differs from the compute dtype);
"gather" under FSDP with several ranks: the head gathered for the teacher pass is kept (one copy,
the same bytes as the all-gather it replaces).
"""
from __future__ import annotations

import contextlib

import torch


def local_tensor(parameter: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 parameter (a DTensor), or the tensor itself. A view: writing
    to it writes the parameter's shard storage, which FSDP's next all-gather reads."""
    data = parameter.data
    return data.to_local() if hasattr(data, "to_local") else data


def _is_sharded(parameter: torch.Tensor) -> bool:
    mesh = getattr(parameter, "device_mesh", None)
    return mesh is not None and mesh.size() > 1


EXCHANGE_CHUNK_BYTES = 16 * 2**20


@torch.no_grad()
def _exchange_all(tensors: list[torch.Tensor], others: list[torch.Tensor]) -> None:
    """Swap the contents of each pair (same shape and dtype, any devices) through one buffer of at
    most EXCHANGE_CHUNK_BYTES on the first tensor's device: bitwise, and nothing model-sized."""
    for a, b in zip(tensors, others):
        if not (a.is_contiguous() and b.is_contiguous()):
            buffer = a.clone()
            a.copy_(b)
            b.copy_(buffer)
            continue
        a_flat, b_flat = a.view(-1), b.view(-1)
        step = max(1, EXCHANGE_CHUNK_BYTES // a.element_size())
        for start in range(0, a_flat.numel(), step):
            x, y = a_flat[start:start + step], b_flat[start:start + step]
            buffer = x.clone()
            x.copy_(y)
            y.copy_(buffer)


class TeacherSnapshot:
    def __init__(self, model: torch.nn.Module, refresh_every: int, *, device: str = "cpu", dtype: str = "same",
                 ema: float = 0.0, base_teacher=None):
        """`base_teacher`: a context-manager factory under which the model *is* the frozen
        teacher (peft's `disable_adapter`); used for M = 0 instead of a snapshot."""
        self.model = model
        self.refresh_every = refresh_every
        self.ema = ema
        self.base_teacher = base_teacher
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]  # tied weights once
        self.names = [name for name, _ in named]
        self.parameters = [p for _, p in named]
        self.snapshot: list[torch.Tensor] | None = None
        self.refreshes: list[int] = []  # steps after which the snapshot was refreshed (every step with EMA)
        if refresh_every == 1 and ema == 0:
            self.mode = "live"
        elif refresh_every == 0 and ema == 0 and base_teacher is not None:
            self.mode = "base"
        else:
            self.mode = "snapshot"
            self.device = device
            self.dtype = None if dtype == "same" else getattr(torch, dtype)
            self.snapshot = [self._empty_like(local_tensor(p)) for p in self.parameters]
            self._copy_from_model()
        head = model.lm.get_output_embeddings() if hasattr(model, "lm") else None
        self._head = None
        if self.mode == "snapshot" and head is not None:
            indices = {id(p): i for i, p in enumerate(self.parameters)}
            weight = indices.get(id(head.weight))
            if weight is not None:  # the head is trained, so the teacher's differs from the student's
                bias = getattr(head, "bias", None)
                self._head = (weight, None if bias is None else indices.get(id(bias)))
                self._head_sharded = _is_sharded(head.weight)

    def _empty_like(self, tensor: torch.Tensor) -> torch.Tensor:
        device = torch.device("cpu") if self.device == "cpu" else tensor.device
        pin = device.type == "cpu" and tensor.device.type == "cuda"
        return torch.empty(tensor.shape, dtype=self.dtype or tensor.dtype, device=device, pin_memory=pin)

    @property
    def live(self) -> bool:
        """True when the teacher is the current student (M = 1)."""
        return self.mode == "live"

    @property
    def head_source(self) -> str:
        """Where the loss gets the teacher's lm_head: "shared", "snapshot" or "gather" (module doc)."""
        if self._head is None:
            return "shared"
        return "gather" if self._head_sharded else "snapshot"

    def snapshot_head(self, device: torch.device, dtype: torch.dtype):
        """The teacher's (weight, bias) straight from the snapshot: the snapshot's own tensors when
        device and dtype match (no copy), else one cast / transfer. Only for head_source "snapshot"."""
        from crisp_fast.train.modeling import TeacherHead

        weight_index, bias_index = self._head
        weight = self.snapshot[weight_index].to(device=device, dtype=dtype, non_blocking=True)
        bias = None if bias_index is None else self.snapshot[bias_index].to(device=device, non_blocking=True)
        return TeacherHead(weight, bias)

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """The snapshotted parameters, by name, in snapshot order."""
        return list(zip(self.names, self.parameters))

    def bytes(self) -> int:
        return 0 if self.snapshot is None else sum(t.numel() * t.element_size() for t in self.snapshot)

    @torch.no_grad()
    def _copy_from_model(self):
        for saved, parameter in zip(self.snapshot, self.parameters):
            saved.copy_(local_tensor(parameter), non_blocking=True)
        self._synchronize()

    def _synchronize(self):
        if any(s.device.type == "cuda" or s.is_pinned() for s in self.snapshot):
            torch.cuda.synchronize()

    @torch.no_grad()
    def _ema_from_model(self):
        for saved, parameter in zip(self.snapshot, self.parameters):
            current = local_tensor(parameter).to(device=saved.device, dtype=saved.dtype)
            saved.lerp_(current, self.ema)
        self._synchronize()

    def maybe_refresh(self, step: int) -> bool:
        """Call after optimizer step `step` (1-based). Returns True if the teacher was updated."""
        if self.snapshot is None:
            return False
        if self.ema > 0:
            self._ema_from_model()
        elif self.refresh_every == 0 or step % self.refresh_every != 0:
            return False
        else:
            self._copy_from_model()
        self.refreshes.append(step)
        return True

    @contextlib.contextmanager
    def swapped_in(self):
        """Inside: the model computes as the teacher (no grad allowed to flow). The student's
        shards are restored (or its adapters re-enabled) on exit, even after an exception."""
        if self.mode == "live":
            yield
            return
        if self.mode == "base":
            with self.base_teacher():
                yield
            return
        locals_ = [local_tensor(p) for p in self.parameters]
        if self._exchangeable(locals_):
            # the snapshot and the shards trade contents through a small buffer: no stash, no copy
            # of the model; on exit they trade back, so the snapshot is the teacher again
            _exchange_all(locals_, self.snapshot)
            try:
                yield
            finally:
                _exchange_all(locals_, self.snapshot)
            return
        with torch.no_grad():  # a snapshot in another dtype cannot hold the student: stash it
            stash = [t.clone() for t in locals_]
            for target, saved in zip(locals_, self.snapshot):
                target.copy_(saved, non_blocking=True)
        try:
            yield
        finally:
            with torch.no_grad():
                for target, original in zip(locals_, stash):
                    target.copy_(original)
            del stash

    def _exchangeable(self, locals_) -> bool:
        # FSDP2 shards (DTensors) keep the stash: exchanging into them aborted a 2-rank gloo run at exit
        # in ~1 of 15 runs (tests/test_train_fsdp.py), not yet understood
        if any(hasattr(p.data, "to_local") for p in self.parameters):
            return False
        return all(s.dtype == t.dtype and s.shape == t.shape for s, t in zip(self.snapshot, locals_))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The snapshot's local shards by parameter name (for checkpoints)."""
        if self.snapshot is None:
            return {}
        return dict(zip(self.names, self.snapshot))
