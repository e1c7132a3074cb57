"""Colocated vLLM rollouts (optional extra `vllm`, CUDA only).

One vLLM engine per training rank, in the same process (`distributed_executor_backend=
"external_launcher"`), sleeping while the trainer trains:

    engine = VLLMEngine(model, tokenizer, model_path="Qwen/Qwen3-8B", gpu_memory_utilization=0.3)
    engine.push_weights(model)            # after every optimizer step: layer by layer, bounded memory
    generations = engine.generate(prompt_ids, sampling)   # wakes, samples, sleeps again

Everything that needs no vLLM (weight-name mapping, bounded weight streaming, sampling-parameter
translation, output conversion) is plain Python here and unit-tested on CPU.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from crisp_fast.generation import Generation, SamplingConfig

# wrappers that insert a path component into parameter names but are not part of the HF checkpoint
_WRAPPER_PARTS = ("_checkpoint_wrapped_module", "_fsdp_wrapped_module", "_orig_mod", "module")


def hf_parameter_name(name: str) -> str:
    """The Hugging Face checkpoint name of a trainer parameter: drops activation-checkpoint,
    FSDP1, torch.compile and DDP wrapper components (`model.layers.0._checkpoint_wrapped_module.
    mlp.up_proj.weight` -> `model.layers.0.mlp.up_proj.weight`). vLLM's `load_weights` takes HF
    names and does its own fusing (qkv, gate_up), so no further mapping is needed."""
    parts = [part for part in name.split(".") if part not in _WRAPPER_PARTS]
    if not parts:
        raise ValueError(f"parameter name {name!r} has nothing left after removing wrapper components")
    return ".".join(parts)


def iter_full_weights(model: torch.nn.Module, *, max_bytes: int = 1 << 30,
                      dtype: torch.dtype | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield the model's weights as groups of (HF name, full tensor) of at most ~`max_bytes` each.

    An FSDP2 parameter (a DTensor) is gathered alone with `full_tensor()` — every rank must
    iterate in the same order, which `named_parameters` guarantees — so at most one group of
    full tensors exists at a time, never the whole model. A tied lm_head appears once."""
    group: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, parameter in model.named_parameters(remove_duplicate=True):
        tensor = parameter.detach()
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        if dtype is not None:
            tensor = tensor.to(dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if group and size + nbytes > max_bytes:
            yield group
            group, size = [], 0
        group.append((hf_parameter_name(name), tensor))
        size += nbytes
    if group:
        yield group


def sampling_params_kwargs(sampling: SamplingConfig, seed: int | None = None) -> dict:
    """Keyword arguments for `vllm.SamplingParams` meaning exactly what `sampling` means:
    top_k 0 (our "off") is vLLM's "off" too; temperature 0 is greedy in both."""
    kwargs = {
        "n": sampling.n,
        "temperature": float(sampling.temperature),
        "top_p": float(sampling.top_p),
        "top_k": int(sampling.top_k),
        "max_tokens": int(sampling.max_new_tokens),
        "skip_special_tokens": False,
        "detokenize": False,  # the trainer only needs ids; no text round trip
    }
    chosen_seed = sampling.seed if sampling.seed is not None else seed
    if chosen_seed is not None:
        kwargs["seed"] = int(chosen_seed)
    return kwargs


def to_generations(outputs, n_prompts: int, eos_ids: list[int]) -> list[Generation]:
    """Convert vLLM `RequestOutput`s (one per prompt, in order) into `Generation`s. vLLM reports
    "stop" for EOS and stop tokens and "length" at max_tokens; the EOS id is part of the ids."""
    if len(outputs) != n_prompts:
        raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {n_prompts} prompts")
    generations = []
    for prompt_index, request in enumerate(outputs):
        for sample_index, completion in enumerate(request.outputs):
            ids = list(completion.token_ids)
            reason = completion.finish_reason
            if reason not in ("stop", "length"):
                reason = "stop" if ids and ids[-1] in eos_ids else "length"
            generations.append(Generation(prompt_index, sample_index, ids, reason))
    return generations


class VLLMEngine:
    """A colocated vLLM engine for one training rank. `model_path` is where vLLM reads the
    architecture (and initial weights); the trainer's weights are pushed with `push_weights`."""

    def __init__(self, model, tokenizer, *, model_path: str | None = None, gpu_memory_utilization: float = 0.3,
                 max_model_len: int | None = None, dtype: str = "bfloat16", sleep: bool = True,
                 push_bytes: int = 1 << 30, seed: int = 0, **llm_kwargs):
        try:
            from vllm import LLM  # noqa: F401
        except ImportError as error:
            raise ImportError("rollout.engine='vllm' needs the optional extra: pip install 'crisp-fast[vllm]'") from error
        from crisp_fast.generation.hf import eos_token_ids

        path = model_path or getattr(model, "name_or_path", None)
        if not path:
            raise ValueError("VLLMEngine needs model_path (the model's config and weights on disk or the hub)")
        # external_launcher reads the torchrun environment; a single process needs it too
        for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                             ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29511")):
            os.environ.setdefault(key, default)
        self.sleep_between = sleep
        self.push_bytes = push_bytes
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.llm = LLM(model=path, tensor_parallel_size=1, distributed_executor_backend="external_launcher",
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, dtype=dtype,
                       enable_sleep_mode=sleep, seed=seed + int(os.environ["RANK"]), **llm_kwargs)
        self.weights_stale = False
        if sleep:
            self.llm.sleep(level=1)  # keep the initial weights (in host memory) until the first push

    def _vllm_model(self):
        executor = self.llm.llm_engine.model_executor
        worker = executor.driver_worker
        runner = getattr(worker, "model_runner", None) or worker.worker.model_runner
        return runner.model

    def push_weights(self, model: torch.nn.Module) -> None:
        """Copy the trainer's current weights into vLLM, one bounded group at a time. Collective
        under FSDP2: every rank must call it."""
        if self.sleep_between:
            self.llm.wake_up(tags=["weights"])
        target = self._vllm_model()
        for group in iter_full_weights(model, max_bytes=self.push_bytes):
            target.load_weights(group)
            del group
        self.llm.reset_prefix_cache()
        if self.sleep_between:
            self.llm.sleep(level=1)

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[Generation]:
        from vllm import SamplingParams

        if self.sleep_between:
            torch.cuda.empty_cache()
            self.llm.wake_up()
        try:
            params = SamplingParams(**sampling_params_kwargs(sampling))
            outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids],
                                        sampling_params=params, use_tqdm=False)
        finally:
            if self.sleep_between:
                self.llm.sleep(level=1)
        return to_generations(outputs, len(prompt_ids), self.eos_ids)
