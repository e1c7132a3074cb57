"""Padding-free packing: the sequences of a micro-batch as one row, attention confined to each.

A packed micro-batch is one row `[1, L]` holding every sequence back to back, with position ids
that restart at 0 where each sequence starts and no attention mask. No pad token goes through
the model, so a micro-batch costs its real tokens only. What confines attention to each
sequence depends on the attention implementation:

  flash_attention_2 / _3   transformers' varlen path: `cu_seq_lens_q/k` and `max_length_q/k`
                           are passed to the decoder, flash-attn's varlen kernel does the rest.
  sdpa                     swapped for `crisp_packed_sdpa` (registered here): one
                           `scaled_dot_product_attention(is_causal=True)` call per sequence on
                           its slice of q, k, v. Exact, and no L x L mask or score tensor is
                           ever built (a block-diagonal mask would be L x L: 1 GiB of bools at
                           L = 32,768, more as floats); on CPU and CUDA SDPA's causal kernels
                           are tiled. Outside packed forwards (rollouts, a padded batch) it is
                           plain sdpa with the ordinary mask.

  eager                    transformers' own packed-sequence mask (it finds the sequences from the
                           position ids): exact, but an L x L mask on top of eager's L x L
                           scores; a line says so.

Any other implementation (flex_attention, paged attention, hub kernels, ...) is not known to
confine attention to each sequence here: `check_packing_supported` names it and fails before
the model is loaded.
The row layout is also what sequence parallelism shards later: one long row plus `cu_seq_lens`.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch

PACKED_SDPA = "crisp_packed_sdpa"
FLASH_VARLEN = ("flash_attention_2", "flash_attention_3")
SUPPORTED = ("sdpa", PACKED_SDPA, "eager") + FLASH_VARLEN

# set while a packed forward runs: the mask function then builds nothing (attention is confined
# by cu_seq_lens instead)
_IN_PACKED_FORWARD = contextvars.ContextVar("crisp_in_packed_forward", default=False)
_REGISTERED = False


def cu_seq_lens_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """[1, L] position ids restarting at 0 per sequence -> int32 cumulative lengths [n + 1]."""
    if position_ids.dim() != 2 or position_ids.shape[0] != 1:
        raise ValueError(f"packed position_ids must have shape [1, L], got {tuple(position_ids.shape)}")
    starts = torch.nonzero(position_ids[0] == 0).flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        raise ValueError("packed position_ids must start at 0 (each sequence counts from 0)")
    end = torch.tensor([position_ids.shape[1]], device=position_ids.device)
    return torch.cat([starts, end]).to(torch.int32)


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """An attention function for transformers' AttentionInterface. Packed forward (kwargs carry
    `cu_seq_lens_q`): SDPA per sequence, causal within it. Otherwise: transformers' sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seq_lens = kwargs.pop("cu_seq_lens_q", None)
    if cu_seq_lens is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if getattr(module, "sliding_window", None):
        raise ValueError(f"{PACKED_SDPA}: sliding-window attention is not supported in packed forwards "
                         f"(layer {getattr(module, 'layer_idx', '?')}); set train.packing=false")
    for name in ("cu_seq_lens_k", "max_length_q", "max_length_k", "is_causal"):
        kwargs.pop(name, None)
    bounds = cu_seq_lens.tolist()
    if query.shape[0] != 1 or bounds[-1] != query.shape[2]:
        raise ValueError(f"{PACKED_SDPA}: query of shape {tuple(query.shape)} is not one packed row of "
                         f"{bounds[-1]} tokens")
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        out, _ = sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end],
                                        value[:, :, start:end], None, dropout=dropout, scaling=scaling,
                                        is_causal=True, **kwargs)
        outputs.append(out)  # [1, len, heads, head_dim]
    return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0], None


def packed_sdpa_mask(*args, **kwargs):
    """The mask for `crisp_packed_sdpa`: none in a packed forward, sdpa's otherwise."""
    if _IN_PACKED_FORWARD.get():
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Make `crisp_packed_sdpa` known to transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)
    _REGISTERED = True


def check_packing_supported(implementation: str) -> None:
    if implementation not in SUPPORTED:
        raise ValueError(
            f"train.packing=true cannot confine attention to each sequence with model.attn_implementation "
            f"{implementation!r}: packing needs sdpa (run per sequence), {' / '.join(FLASH_VARLEN)} (varlen) "
            f"or eager (a block-diagonal mask); set model.attn_implementation to one of those, or "
            f"train.packing=false")


def prepare_for_packing(lm) -> str:
    """Switch an sdpa model to `crisp_packed_sdpa` (same numbers outside packed forwards); leave a
    flash-attention model as it is. Returns the implementation in use; errors name the bad one."""
    implementation = lm.config._attn_implementation
    check_packing_supported(implementation)
    if implementation == "sdpa":
        register()
        lm.set_attn_implementation(PACKED_SDPA)
        implementation = PACKED_SDPA
    elif implementation == "eager":
        print("crisp: train.packing with eager attention: each packed row gets an L x L block-diagonal "
              "mask (sdpa or flash_attention_2 avoid it)")
    return implementation


def packed_decoder_kwargs(position_ids: torch.Tensor) -> dict:
    """What the decoder needs for one packed row: cu_seq_lens and max lengths (flash varlen reads
    these, `crisp_packed_sdpa` reads cu_seq_lens_q)."""
    cu_seq_lens = cu_seq_lens_from_positions(position_ids)
    longest = int((cu_seq_lens[1:] - cu_seq_lens[:-1]).max())
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens, "max_length_q": longest,
            "max_length_k": longest}


@contextlib.contextmanager
def packed_forward():
    token = _IN_PACKED_FORWARD.set(True)
    try:
        yield
    finally:
        _IN_PACKED_FORWARD.reset(token)
