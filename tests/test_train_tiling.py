"""Sequence-tiled decoder MLPs (crisp_fast/train/tiling.py): the same loss and gradients as the
untiled model (float64 and in a real fp32 trainer step), no MLP intermediates kept in a
checkpointed layer, and clear errors. Budget: ~10 s on 2 CPU cores."""
import random

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from crisp_fast.train.fsdp import enable_activation_checkpointing
from crisp_fast.train.tiling import tile_mlps
from crisp_fast.train.tiny import tiny_config, write_problems
from tests.test_train_packing import generations_of_different_lengths, make_trainer, step_gradients


def tiny_lm(weights_seed):
    config = Qwen3Config(vocab_size=101, hidden_size=24, intermediate_size=72, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=1, head_dim=8, attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(weights_seed)
        return Qwen3ForCausalLM(config).double().train()


def loss_and_grads(lm, ids):
    out = lm(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {name: p.grad.clone() for name, p in lm.named_parameters()}


@pytest.mark.parametrize("checkpointing", [True, False])
def test_tiled_mlp_gives_the_untiled_loss_and_gradients(seed, checkpointing):
    ids = torch.randint(0, 101, (random.randint(1, 3), random.randint(20, 90)))
    tile = random.randint(1, 19)  # several tiles, a ragged last one
    reference = loss_and_grads(tiny_lm(seed), ids)
    lm = tiny_lm(seed)
    if checkpointing:
        enable_activation_checkpointing(lm)
    assert tile_mlps(lm, tile) == 2
    loss, grads = loss_and_grads(lm, ids)
    torch.testing.assert_close(loss, reference[0], rtol=1e-13, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[1][name], rtol=1e-12, atol=1e-15, msg=name)
    with torch.no_grad():  # the teacher pass: tiles without checkpoints
        torch.testing.assert_close(lm(input_ids=ids).logits, tiny_lm(seed)(input_ids=ids).logits, rtol=1e-13, atol=0)


def test_a_checkpointed_layer_keeps_no_mlp_intermediates(seed):
    """What autograd saves when a checkpointed layer's MLP runs tiled: one tile's rows come back in
    backward by recomputation, so nothing intermediate-wide is saved (untiled: 4 per token)."""
    lm = tiny_lm(seed)
    enable_activation_checkpointing(lm)
    mlp = lm.get_decoder().layers[0].mlp
    tokens = random.randint(40, 90)
    hidden = torch.randn(1, tokens, 24, dtype=torch.float64, requires_grad=True)

    def saved_bytes():
        total = [0]
        parameters = {p.untyped_storage().data_ptr() for p in lm.parameters()}

        def pack(tensor):
            if tensor.untyped_storage().data_ptr() not in parameters | {hidden.untyped_storage().data_ptr()}:
                total[0] += tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mlp(hidden).sum().backward()
        return total[0]

    untiled = saved_bytes()
    assert untiled >= 4 * tokens * 72 * 8
    tile_mlps(lm, 16)
    assert saved_bytes() == 0
    tile_mlps(lm, 0)  # off again
    assert saved_bytes() == untiled


def test_a_tiled_checkpointed_trainer_step_equals_the_untiled_one(tmp_path, seed):
    common = ["train.teacher_refresh_every=0", "train.grad_clip=1.0e9", "model.seed=7",
              "model.activation_checkpointing=on", "train.micro_batch_tokens=4096"]
    untiled = make_trainer(tmp_path, "untiled", common + ["model.mlp_tile_tokens=0"], data_seed=seed)
    tiled = make_trainer(tmp_path, "tiled", common + [f"model.mlp_tile_tokens={random.randint(5, 40)}"],
                         data_seed=seed)
    for trainer in (untiled, tiled):
        generator = torch.Generator().manual_seed(seed)
        for tensor in trainer.teacher.snapshot:
            tensor.add_(3.0 * tensor.std().nan_to_num(0.1) * torch.randn(tensor.shape, generator=generator))
    pairs = untiled.stream.take(3)
    generations = generations_of_different_lengths(6, len(untiled.tokenizer), untiled.tokenizer.eos_token_id)
    reference, reference_grads = step_gradients(untiled, pairs, generations)
    metrics, grads = step_gradients(tiled, tiled.stream.take(3), generations)
    assert reference["activation_checkpointing"] and metrics["activation_checkpointing"]
    assert metrics["loss"] == pytest.approx(reference["loss"], rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-8, msg=name)


def test_bad_tile_settings_fail_clearly(tmp_path):
    data = write_problems(tmp_path / "p.jsonl")
    with pytest.raises(ValueError, match="model.mlp_tile_tokens must be >= 0"):
        tiny_config(data, tmp_path / "out", ["model.mlp_tile_tokens=-1"])
    lm = tiny_lm(0)
    del lm.get_decoder().layers[1].mlp
    with pytest.raises(ValueError, match="Qwen3DecoderLayer has no .mlp"):
        tile_mlps(lm, 8)
