"""Process group, FSDP2 wrapping and activation checkpointing.

One process in fp32: no process group, no wrapping. Under torchrun, or in one process with bf16
mixed precision or CPU offload (a 1-rank process group): `fully_shard` on every decoder layer,
then on the `CrispModel` root (embeddings, final norm and lm_head form the root group, gathered
for the span of each `CrispModel.forward`). bf16 compute with fp32 master weights and fp32
gradient reduction on CUDA by default (`model.mixed_precision`); `model.cpu_offload` keeps
parameters, gradients and optimizer state on the host (FSDP2's CPUOffloadPolicy).
"""
from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return rank, world, device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: list[float], device) -> list[float]:
    if not is_distributed():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_max(value: int, device) -> int:
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def decoder_layers(lm) -> list[torch.nn.Module]:
    layers = getattr(lm.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(lm).__name__}: cannot find the decoder layers (expected .get_decoder().layers)")
    return list(layers)


def enable_activation_checkpointing(lm) -> None:
    """Recompute each decoder layer in backward (non-reentrant, so it composes with FSDP2)."""
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = False


def use_bf16(mixed_precision: str, device: torch.device) -> bool:
    """model.mixed_precision: "auto" is bf16 on CUDA and off on CPU (bf16 GEMMs on CPUs without
    AMX are slower than fp32, and nothing there is short of memory enough to pay for it)."""
    return mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda")


def _one_rank_group(device: torch.device) -> None:
    """A process group of this process alone (an in-memory store, no ports, no environment), so
    that one process is sharded by the same FSDP2 code as many: the same bf16 / offload policy."""
    if dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def wrap(crisp_model, device: torch.device, mixed_precision: str, cpu_offload: bool = False) -> torch.nn.Module:
    """Move to `device` and shard with FSDP2 (layers, then the root) when distributed, or in one
    process when bf16 or CPU offload is asked for: FSDP2 on a 1-rank group gives one process the
    policy of many, exactly (bf16 compute copies of the parameters made at each gather, fp32
    master weights, gradients and optimizer state, fp32 gradient reduction), where torch.autocast
    would differ (fp32 residual stream and norms, bf16 only inside matmuls, a custom autograd
    function like the fused loss left in fp32). With neither, one process is left unwrapped."""
    bf16 = use_bf16(mixed_precision, device)
    if not is_distributed() and not bf16 and not cpu_offload:
        return crisp_model.to(device)
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if not is_distributed():
        _one_rank_group(device)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    if cpu_offload:
        # parameters (the fp32 shards), their gradients and so the optimizer state live on the host;
        # each layer's shard is copied to the device for its all-gather, its gradient back to the host
        offload = CPUOffloadPolicy(pin_memory=device.type == "cuda")
        crisp_model.to("cpu")
    else:
        offload = OffloadPolicy()
        crisp_model.to(device)
    for layer in decoder_layers(crisp_model.lm):
        fully_shard(layer, mp_policy=policy, offload_policy=offload)
    fully_shard(crisp_model, mp_policy=policy, offload_policy=offload)
    # FSDP2 initialises its root on the first forward *through the root*; rollouts call the inner
    # model (and its layers) directly, so run one token through the root now
    one = torch.ones((1, 1), dtype=torch.long, device=device)
    with torch.no_grad():
        crisp_model(one, one, one - 1, torch.zeros(1, dtype=torch.long, device=device))
    reshard_all(crisp_model)
    return crisp_model


def reshard_all(model) -> None:
    """Free every gathered parameter, so the next forward re-reads the (possibly swapped) shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextlib.contextmanager
def root_gathered(model):
    """Gather the root group (embeddings, norm, lm_head) for code that calls the inner HF model
    directly, e.g. `generate`; decoder layers gather themselves through their own hooks."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        reshard_all(model)
