"""The teacher as a snapshot of the student's *sharded* parameters, swapped in for the no-grad
teacher pass and swapped out again — no second model, no second FSDP wrapper, no full gather.

M = teacher_refresh_every:
  M = 1  the teacher is the live student: no snapshot, no swap, no extra memory.
  M = 0  the snapshot is the initial weights, never refreshed.
  M > 1  the snapshot is refreshed (a local copy_, no communication) after optimizer steps
         M, 2M, 3M, ...: steps kM+1 .. (k+1)M are scored by the weights at the end of step kM.

Cost (P = local shard elements on this rank = parameters / world size):
  memory  the snapshot: P * bytes(snapshot dtype), on the configured device (CPU: host memory);
          during a swap, a stash of the student's local shards: P * bytes(param dtype) on the
          parameters' device, freed right after.
  time    per teacher pass: three copies of the local shards (stash, load snapshot, restore),
          i.e. ~3 * P * bytes over the memory bus (host<->device if the snapshot is on CPU).
"""
from __future__ import annotations

import contextlib

import torch


def local_tensor(parameter: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 parameter (a DTensor), or the tensor itself. A view: writing
    to it writes the parameter's shard storage, which FSDP's next all-gather reads."""
    data = parameter.data
    return data.to_local() if hasattr(data, "to_local") else data


class TeacherSnapshot:
    def __init__(self, model: torch.nn.Module, refresh_every: int, *, device: str = "cpu", dtype: str = "same"):
        self.model = model
        self.refresh_every = refresh_every
        self.parameters = [p for p in model.parameters()]  # deduplicated (tied weights once)
        self.snapshot: list[torch.Tensor] | None = None
        self.refreshes: list[int] = []  # steps after which the snapshot was refreshed
        if refresh_every != 1:
            self.device = device
            self.dtype = None if dtype == "same" else getattr(torch, dtype)
            self.snapshot = [self._empty_like(local_tensor(p)) for p in self.parameters]
            self._copy_from_model()

    def _empty_like(self, tensor: torch.Tensor) -> torch.Tensor:
        device = torch.device("cpu") if self.device == "cpu" else tensor.device
        pin = device.type == "cpu" and tensor.device.type == "cuda"
        return torch.empty(tensor.shape, dtype=self.dtype or tensor.dtype, device=device, pin_memory=pin)

    @property
    def live(self) -> bool:
        """True when the teacher is the current student (M = 1)."""
        return self.snapshot is None

    def bytes(self) -> int:
        return 0 if self.snapshot is None else sum(t.numel() * t.element_size() for t in self.snapshot)

    @torch.no_grad()
    def _copy_from_model(self):
        for saved, parameter in zip(self.snapshot, self.parameters):
            saved.copy_(local_tensor(parameter), non_blocking=True)
        if any(s.device.type == "cuda" or s.is_pinned() for s in self.snapshot):
            torch.cuda.synchronize()

    def maybe_refresh(self, step: int) -> bool:
        """Call after optimizer step `step` (1-based). Returns True if the teacher was refreshed."""
        if self.snapshot is None or self.refresh_every == 0 or step % self.refresh_every != 0:
            return False
        self._copy_from_model()
        self.refreshes.append(step)
        return True

    @contextlib.contextmanager
    def swapped_in(self):
        """Inside: the model's parameters hold the teacher weights (no grad allowed to flow).
        The student's shards are restored on exit, even after an exception."""
        if self.snapshot is None:
            yield
            return
        locals_ = [local_tensor(p) for p in self.parameters]
        with torch.no_grad():
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

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The snapshot's local shards by parameter name (for checkpoints)."""
        if self.snapshot is None:
            return {}
        names = [name for name, _ in self.model.named_parameters()]
        return dict(zip(names, self.snapshot))
