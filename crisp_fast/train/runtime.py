"""Checks and settings made once, before the first step: the loss backend that will actually
run, torch's CPU thread count, how freed host memory is returned, and a tokenizer that fits the
model's embedding."""
from __future__ import annotations

import ctypes
import sys
import warnings

import torch

# Below this many parameters a CPU model is "tiny": its matmuls are so small that torch's
# intra-op threads cost more in synchronisation than they save. Measured (docs/train.md,
# "Threads"): configs/tiny.yaml generation on a busy 2-core machine, 1 thread vs 2.
TINY_MODEL_PARAMETERS = 50_000_000


def resolve_loss_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend `crisp_fast.fused_linear_reverse_kl(backend=requested)` will run for this
    device and dtype ("torch", "triton" or "native"); a warning when auto falls back to the slow
    torch backend on CPU because the native one is not built."""
    from crisp_fast.loss import available_backends, resolve_backend

    try:
        module = resolve_backend(requested, device, dtype)
    except (RuntimeError, TypeError, ValueError, ImportError) as error:
        raise ValueError(f"train.loss_backend={requested!r} cannot run here: {error}") from None
    name = module.__name__.rsplit(".", 1)[-1]
    if device.type == "cpu" and requested == "auto" and name == "torch":
        why = available_backends().get("native", "unknown")
        warnings.warn(f"the native C++ loss backend is not available ({why}); the loss runs on the slower torch "
                      f"backend. Build it with: pip install --no-build-isolation --no-deps -e .", stacklevel=2)
    return name


# glibc serves allocations above its mmap threshold with their own mappings, which free() returns
# to the OS at once; smaller ones come from the heap, where a freed block stays resident until the
# heap's top is trimmed. The threshold starts at 128 KiB but rises to the size of any mapped block
# that is freed (up to 32 MiB), so after the first large tensor is freed, every activation and
# gradient of a few MiB lands in the heap, and the holes backward leaves there stay resident.
# Measured on a 4k-token step of the benchmark model: 905 MB over the step's start with glibc's
# default, 697 MB with a fixed 1 MiB threshold, at the same step time (44-46 s).
MMAP_THRESHOLD_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def return_freed_host_memory(device: torch.device) -> bool:
    """On a CPU run under glibc, fix malloc's mmap threshold at MMAP_THRESHOLD_BYTES, so a
    freed tensor of 1 MiB or more leaves the resident set at once (see above). Returns True
    when set; False elsewhere (a GPU run's tensors are in CUDA's own allocator; not glibc)."""
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1


def choose_threads(requested: int, device: torch.device, parameters: int) -> int | None:
    """The torch thread count to set (None: leave torch's default). 0 = auto: 1 thread for a
    tiny model on CPU, torch's default otherwise (GPU runs, and CPU models big enough for
    threads to pay)."""
    if requested > 0:
        return requested
    if device.type == "cpu" and parameters < TINY_MODEL_PARAMETERS:
        return 1
    return None


def check_vocabulary(model, tokenizer, tokenizer_name: str) -> None:
    """Every token id the tokenizer can produce must have a row in the embedding and the head;
    otherwise the first rollout dies with an index error deep inside the model."""
    rows = model.get_input_embeddings().num_embeddings
    head = model.get_output_embeddings()
    if head is not None and hasattr(head, "weight"):
        rows = min(rows, head.weight.shape[0])
    if len(tokenizer) > rows:
        raise ValueError(f"the tokenizer ({tokenizer_name}) has {len(tokenizer)} tokens but the model's embedding has "
                         f"{rows} rows, so token ids >= {rows} would crash the model; is model.tokenizer the model's "
                         f"own tokenizer? (\"\" = the model's folder)")
