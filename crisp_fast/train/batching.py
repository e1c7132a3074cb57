"""Turning (prompt ids, response ids) pairs into model inputs (padded rows, or one packed row)
and micro-batches.

Alignment by construction: for a row `prompt + response`, the model input is that row without
its last token, and the hidden state at position `len(prompt) - 1 + j` predicts response token
j. Student and teacher rows share the response ids, so row j of the student's and teacher's
selected hidden states always refer to the same response token, whatever the padding or packing.
The loss sees only the gathered [N, D] hidden states and per-token weights, never rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SideInputs:
    input_ids: torch.Tensor              # [B, L]; packed: [1, sum of row lengths]
    attention_mask: torch.Tensor | None  # [B, L]; packed: None (confined by the position ids)
    position_ids: torch.Tensor           # [B, L], counted from each sequence's first real token
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


def packed_side_inputs(prompts: list[list[int]], responses: list[list[int]], device) -> SideInputs:
    """Every `prompt + response[:-1]` back to back in one row, position ids restarting at 0 for
    each (see crisp_fast.train.packing): no pad token, no attention mask."""
    input_ids, position_ids, gather = [], [], []
    for prompt, response in zip(prompts, responses):
        row = prompt + response[:-1]
        first = len(input_ids) + len(prompt) - 1
        gather.extend(range(first, first + len(response)))
        input_ids.extend(row)
        position_ids.extend(range(len(row)))
    as_row = lambda values: torch.tensor([values], dtype=torch.long, device=device)  # noqa: E731
    return SideInputs(as_row(input_ids), None, as_row(position_ids),
                      torch.tensor(gather, dtype=torch.long, device=device))


def micro_batch_tokens(lengths: list[int], packed: bool) -> int:
    """Tokens one forward of these rows puts through the model: their sum when packed, else
    count x longest (the padded rectangle)."""
    if not lengths:
        return 0
    return sum(lengths) if packed else len(lengths) * max(lengths)


def plan_micro_batches(lengths: list[int], budget: int, packed: bool = False) -> list[list[int]]:
    """Consecutive groups (longest first) whose forward size stays within `budget` tokens: real
    tokens when `packed`, count * longest row otherwise; a row longer than the budget gets a
    micro-batch of its own."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for index in order:
        if groups and micro_batch_tokens([lengths[i] for i in groups[-1]] + [lengths[index]], packed) <= budget:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups
