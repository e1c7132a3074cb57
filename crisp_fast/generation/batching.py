"""Token-budget batching shared by the rollout engines (pure Python, no model needed)."""
from __future__ import annotations


def plan_batches(prompt_lengths: list[int], max_new_tokens: int, max_batch_tokens: int,
                 max_batch_size: int | None = None) -> list[list[int]]:
    """Group prompt indices into batches whose padded footprint
    `batch_size * (longest prompt + max_new_tokens)` stays within `max_batch_tokens`.

    Prompts are sorted by length (longest first) so that padding is small; a single prompt that
    alone exceeds the budget still gets a batch of its own (it must be generated somehow).
    Every index appears exactly once."""
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
    order = sorted(range(len(prompt_lengths)), key=lambda i: (-prompt_lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        # sorted longest first, so the first member of a batch is its longest
        longest = prompt_lengths[current[0]] if current else prompt_lengths[index]
        fits = (len(current) + 1) * (longest + max_new_tokens) <= max_batch_tokens
        full = max_batch_size is not None and len(current) >= max_batch_size
        if current and (not fits or full):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches
