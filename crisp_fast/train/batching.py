"""Turning (prompt ids, response ids) pairs into padded model inputs and micro-batches.

Alignment by construction: for a row `prompt + response`, the model input is that row without
its last token, and the hidden state at position `len(prompt) - 1 + j` predicts response token
j. Student and teacher rows share the response ids, so row j of the student's and teacher's
selected hidden states always refer to the same response token, whatever the padding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SideInputs:
    input_ids: torch.Tensor       # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    position_ids: torch.Tensor    # [B, L], counted from each row's first real token
    gather_index: torch.Tensor    # [N]: flat (row * L + column) of the response-predicting positions

    def as_args(self):
        return self.input_ids, self.attention_mask, self.position_ids, self.gather_index


def side_inputs(prompts: list[list[int]], responses: list[list[int]], pad_id: int, padding_side: str,
                device) -> SideInputs:
    rows = [prompt + response[:-1] for prompt, response in zip(prompts, responses)]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    gather = []
    for b, (row, prompt, response) in enumerate(zip(rows, prompts, responses)):
        offset = width - len(row) if padding_side == "left" else 0
        input_ids[b, offset:offset + len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[b, offset:offset + len(row)] = 1
        position_ids[b, offset:offset + len(row)] = torch.arange(len(row))
        first = b * width + offset + len(prompt) - 1
        gather.extend(range(first, first + len(response)))
    return SideInputs(input_ids.to(device), attention_mask.to(device), position_ids.to(device),
                      torch.tensor(gather, dtype=torch.long, device=device))


def plan_micro_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive groups whose padded size (count * longest row) stays within `budget` tokens;
    a row longer than the budget gets a micro-batch of its own. Longest first, to pad little."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for index in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= budget:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups
