"""Rollouts with Hugging Face `generate`: left padding, token-budget batching, CPU or GPU, and
models wrapped by FSDP2 (every rank must call `generate` the same number of times; this engine
makes the ranks agree on the number of batches and decodes with `synced_gpus`).

    engine = HFEngine(model, tokenizer, max_batch_tokens=65536)
    generations = engine.generate([[1, 2, 3], [4, 5]], SamplingConfig(n=2, max_new_tokens=64))
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from transformers import GenerationConfig

from crisp_fast.generation import Generation, SamplingConfig
from crisp_fast.generation.batching import plan_batches


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a response: the model's generation config and the tokenizer's EOS."""
    ids: list[int] = []
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                   getattr(tokenizer, "eos_token_id", None)):
        if source is None:
            continue
        for value in (source if isinstance(source, (list, tuple)) else [source]):
            if value is not None and int(value) not in ids:
                ids.append(int(value))
    if not ids:
        raise ValueError("neither the model's generation_config nor the tokenizer defines an EOS token id")
    return ids


def split_response(row: list[int], eos_ids: list[int], max_new_tokens: int) -> tuple[list[int], str]:
    """Cut a generated row after its first EOS (kept) and name why it ended."""
    for position, token in enumerate(row):
        if token in eos_ids:
            return row[: position + 1], "stop"
    return row[:max_new_tokens], "length"


class HFEngine:
    """Sample with `model.generate`. `max_batch_tokens` bounds `batch * (longest prompt +
    max_new_tokens)` per `generate` call; `max_batch_size` optionally caps the batch too."""

    def __init__(self, model, tokenizer, *, max_batch_tokens: int = 262_144, max_batch_size: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_batch_size = max_batch_size
        self.eos_ids = eos_token_ids(model, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else self.eos_ids[0]

    def _device(self) -> torch.device:
        for parameter in self.model.parameters():
            # an FSDP2 parameter is a DTensor: its local shard says where compute happens
            local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
            return local.device
        return torch.device("cpu")

    def _generation_config(self, sampling: SamplingConfig) -> GenerationConfig:
        # a fresh config: the checkpoint's own defaults (e.g. Qwen3's top_k=20) must not leak in
        greedy = sampling.temperature == 0
        return GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else float(sampling.temperature),
            top_p=None if greedy else float(sampling.top_p),
            top_k=None if greedy else int(sampling.top_k),
            max_new_tokens=int(sampling.max_new_tokens),
            num_return_sequences=int(sampling.n),
            pad_token_id=self.pad_id,
            eos_token_id=list(self.eos_ids),
            use_cache=True,
        )

    def _left_pad(self, prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt):] = 1
        return input_ids.to(device), attention_mask.to(device)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> list[Generation]:
        for index, prompt in enumerate(prompt_ids):
            if len(prompt) == 0:
                raise ValueError(f"prompt_ids[{index}] is empty: every prompt needs at least one token")
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        batches = plan_batches([len(p) for p in prompt_ids], sampling.max_new_tokens * sampling.n,
                               self.max_batch_tokens, self.max_batch_size)
        device = self._device()
        n_calls = len(batches)
        if distributed:
            # with FSDP every forward is collective: all ranks run the same number of generate calls
            count = torch.tensor([n_calls], device=device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            n_calls = int(count.item())
        config = self._generation_config(sampling)
        was_training = self.model.training
        self.model.eval()  # gradient checkpointing turns the KV cache off in training mode
        rng = contextlib.nullcontext()
        if sampling.seed is not None:
            devices = [device] if device.type == "cuda" else []
            rng = torch.random.fork_rng(devices=devices)
        results: dict[int, list[Generation]] = {}
        try:
            with rng:
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                for call in range(n_calls):
                    # a rank with fewer batches decodes a throwaway one to keep the collectives in step
                    batch = batches[call] if call < len(batches) else None
                    prompts = [prompt_ids[i] for i in batch] if batch else [prompt_ids[0] if prompt_ids else [self.eos_ids[0]]]
                    input_ids, attention_mask = self._left_pad(prompts, device)
                    output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                                 generation_config=config, synced_gpus=distributed)
                    if batch is None:
                        continue
                    new_tokens = output[:, input_ids.shape[1]:].tolist()
                    for row, tokens in enumerate(new_tokens):
                        prompt_index = batch[row // sampling.n]
                        ids, reason = split_response(tokens, self.eos_ids, sampling.max_new_tokens)
                        results.setdefault(prompt_index, []).append(
                            Generation(prompt_index, row % sampling.n, ids, reason))
        finally:
            self.model.train(was_training)
        return [generation for index in range(len(prompt_ids)) for generation in results[index]]
