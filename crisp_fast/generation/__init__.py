"""Rollout engines: sample responses from the current policy and keep the exact token ids.

    from crisp_fast.generation import SamplingConfig, make_engine
    engine = make_engine("hf", model, tokenizer)            # or "vllm" (optional extra, CUDA)
    generations = engine.generate(prompt_ids, SamplingConfig(n=1, max_new_tokens=512))

Every engine returns one `Generation` per (prompt, sample) in prompt order, then sample order.
`token_ids` are the ids the sampler drew (EOS included when it was drawn), never text that was
decoded and tokenised again: the trainer scores exactly these ids under student and teacher.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingConfig:
    """How to sample. `top_k = 0` and `top_p = 1.0` switch those filters off; `temperature = 0`
    is greedy decoding. `seed` makes a call reproducible (None: the ambient RNG state)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 8192
    seed: int | None = None

    def __post_init__(self):
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"SamplingConfig.n must be an integer >= 1, got {self.n!r}")
        if not self.temperature >= 0:
            raise ValueError(f"SamplingConfig.temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")


@dataclass
class Generation:
    """One sampled response. `finish_reason` is "stop" (an EOS / stop token was drawn; it is the
    last id) or "length" (`max_new_tokens` reached)."""

    prompt_index: int
    sample_index: int
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"


ENGINES = ("hf", "vllm")


def make_engine(name: str, model, tokenizer, **kwargs):
    """The rollout engine called `name` ("hf" or "vllm") around `model`."""
    if name == "hf":
        from crisp_fast.generation.hf import HFEngine

        return HFEngine(model, tokenizer, **kwargs)
    if name == "vllm":
        from crisp_fast.generation.vllm import VLLMEngine

        return VLLMEngine(model, tokenizer, **kwargs)
    raise ValueError(f"rollout engine must be one of {ENGINES}, got {name!r}")


__all__ = ["SamplingConfig", "Generation", "make_engine", "ENGINES"]
