"""Sequence-tiled decoder MLPs: a long row's MLP runs a tile of tokens at a time.

The MLP is the widest part of a decoder layer: per token it holds gate, up, silu(gate) and
silu(gate) * up, four `intermediate`-wide vectors (about half of what a Qwen3/Llama layer
saves for backward). It is also per-token, so it can run on any split of the tokens and give
the same rows. `tile_mlps` patches each decoder layer's `mlp.forward` (the module tree and the
state dict are untouched) so that a forward over more than `tile_tokens` tokens

  without grad (the teacher pass)   runs tile by tile: only one tile's intermediates exist;
  with grad, in a layer that is     runs each tile under its own non-reentrant checkpoint:
  activation-checkpointed           the layer's recomputation in backward keeps one tile's
                                    MLP intermediates instead of the whole row's, for one
                                    more MLP forward per tile (the MLP is a small part of a
                                    step whose vocabulary projection dominates);
  with grad, checkpointing off      runs whole, as before: the user chose speed over memory.

The idea is the "tiled MLP" of long-sequence training (Arctic Long Sequence Training,
arXiv 2506.13996). Each tile's rows are bitwise those of the whole-row forward wherever the
GEMM gives each row the same reduction order; tests/test_train_tiling.py checks losses and
gradients against the untiled model.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from crisp_fast.train.fsdp import decoder_layers


def tile_mlps(lm, tile_tokens: int) -> int:
    """Give every decoder layer's MLP tiles of `tile_tokens` tokens (0: untiled again).
    Returns the number of MLPs patched; a layer without `.mlp` raises, naming its class."""
    if tile_tokens < 0:
        raise ValueError(f"model.mlp_tile_tokens must be >= 0 (0: off), got {tile_tokens}")
    layers = decoder_layers(lm)
    for layer in layers:
        mlp = getattr(layer, "mlp", None)
        if not isinstance(mlp, torch.nn.Module):
            raise ValueError(f"model.mlp_tile_tokens: {type(layer).__name__} has no .mlp module to tile; "
                             "set model.mlp_tile_tokens=0")
        if "_crisp_untiled_forward" not in vars(mlp):
            untiled = mlp.forward
            object.__setattr__(mlp, "_crisp_untiled_forward", untiled)
            object.__setattr__(mlp, "forward", functools.partial(_tiled_forward, untiled, layer))
        object.__setattr__(mlp, "_crisp_tile_tokens", tile_tokens)
    return len(layers)


def _tiled_forward(untiled, layer, hidden: torch.Tensor, *args, **kwargs):
    tile = layer.mlp._crisp_tile_tokens
    tokens = hidden.shape[:-1].numel()
    if args or kwargs or not tile or tokens <= tile:
        return untiled(hidden, *args, **kwargs)
    grad = torch.is_grad_enabled()
    # HF's checkpointed layers carry `gradient_checkpointing` (transformers' GradientCheckpointingLayer)
    if grad and not getattr(layer, "gradient_checkpointing", False):
        return untiled(hidden)
    rows = hidden.reshape(tokens, hidden.shape[-1])
    outputs = []
    for piece in rows.split(tile):
        out = checkpoint(untiled, piece, use_reentrant=False) if grad else untiled(piece)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"model.mlp_tile_tokens: {type(layer.mlp).__name__}.forward returned "
                            f"{type(out).__name__}, not a tensor; set model.mlp_tile_tokens=0")
        outputs.append(out)
    return torch.cat(outputs).view(*hidden.shape[:-1], outputs[0].shape[-1])
