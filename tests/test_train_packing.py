"""Padding-free packing: one packed row per micro-batch gives the loss and gradients of padded
rows, no pad token reaches the model, and an attention that cannot keep sequences apart fails
before the model is loaded. Budget: ~15 s on 2 CPU cores."""
import random

import pytest
import torch

from crisp_fast.generation import Generation
from crisp_fast.train import Trainer
from crisp_fast.train import loop as loop_module
from crisp_fast.train.batching import packed_side_inputs, side_inputs
from crisp_fast.train.packing import PACKED_SDPA, cu_seq_lens_from_positions
from crisp_fast.train.tiny import tiny_config, write_problems


def make_trainer(tmp_path, name, overrides=(), data_seed=0):
    data = write_problems(tmp_path / "problems.jsonl", count=8, seed=data_seed)
    return Trainer(tiny_config(data, tmp_path / name, list(overrides)))


def generations_of_different_lengths(count, vocab, eos):
    lengths = random.sample(range(1, 40), count)  # all different
    out = []
    for index, length in enumerate(lengths):
        ids = [random.randint(4, vocab - 1) for _ in range(length)]
        ids[-1] = eos if random.random() < 0.5 else ids[-1]
        out.append(Generation(index // 2, index % 2, ids, "stop" if ids[-1] == eos else "length"))
    return out


def step_gradients(trainer, pairs, generations):
    """Run the training half of one step; return its metrics and the gradients before AdamW."""
    captured = {}
    original_step = trainer.optimizer.step

    def capture_then_step(*args, **kwargs):
        captured.update({name: p.grad.detach().clone() for name, p in trainer.model.lm.named_parameters()})
        return original_step(*args, **kwargs)

    trainer.optimizer.step = capture_then_step
    return trainer.train_on_rollouts(pairs, generations), captured


@pytest.mark.parametrize("budget", [4096, 90])  # one packed row / several micro-batches
def test_packed_step_equals_padded_step(tmp_path, seed, budget):
    common = ["train.teacher_refresh_every=0", "train.grad_clip=1.0e9", f"train.micro_batch_tokens={budget}",
              "model.seed=7"]
    padded = make_trainer(tmp_path, "padded", common + ["train.packing=false"], data_seed=seed)
    packed = make_trainer(tmp_path, "packed", common + ["train.packing=true"], data_seed=seed)
    for trainer in (padded, packed):  # the same teacher, far enough from the student for a clear KL
        generator = torch.Generator().manual_seed(seed)
        for tensor in trainer.teacher.snapshot:
            tensor.add_(3.0 * tensor.std().nan_to_num(0.1) * torch.randn(tensor.shape, generator=generator))
    assert packed.model.lm.config._attn_implementation == PACKED_SDPA
    for a, b in zip(padded.model.lm.parameters(), packed.model.lm.parameters()):
        assert torch.equal(a, b)
    pairs = padded.stream.take(3)
    assert [p.student_ids for p in pairs] == [p.student_ids for p in packed.stream.take(3)]
    generations = generations_of_different_lengths(6, len(padded.tokenizer), padded.tokenizer.eos_token_id)

    seen = []  # every input row that reaches the decoder in the packed trainer
    decoder = packed.model.lm.get_decoder()
    hook = decoder.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"]),
                                             with_kwargs=True)
    metrics_padded, grads_padded = step_gradients(padded, pairs, generations)
    metrics_packed, grads_packed = step_gradients(packed, pairs, generations)
    hook.remove()

    if budget == 4096:
        assert metrics_packed["micro_batches"] == metrics_padded["micro_batches"] == 1
    else:
        assert metrics_packed["micro_batches"] > 1
    assert metrics_packed["loss"] > 0.05
    assert metrics_packed["loss"] == pytest.approx(metrics_padded["loss"], rel=1e-6)
    for name, gradient in grads_padded.items():
        scale = gradient.abs().max()
        torch.testing.assert_close(grads_packed[name], gradient, rtol=1e-6, atol=1e-6 * float(scale), msg=name)
    # no pad token went through the model: each forward is one row of real tokens, no more
    rows = [(pairs[g.prompt_index], g.token_ids) for g in generations]
    real = sum(len(p.student_ids) + len(r) - 1 + len(p.teacher_ids) + len(r) - 1 for p, r in rows)
    assert all(ids.shape[0] == 1 for ids in seen)
    assert sum(ids.shape[1] for ids in seen) == real


def test_packed_hidden_states_equal_each_sequence_alone(tmp_path, seed):
    trainer = make_trainer(tmp_path, "alone", data_seed=seed)
    crisp = trainer.model.double().eval()
    prompts = [[random.randint(4, 99) for _ in range(random.randint(1, 9))] for _ in range(5)]
    responses = [[random.randint(4, 99) for _ in range(random.randint(1, 17))] for _ in range(5)]
    packed = packed_side_inputs(prompts, responses, torch.device("cpu"))
    assert packed.attention_mask is None and packed.input_ids.shape[0] == 1
    with torch.no_grad():
        hidden = crisp.response_hidden(*packed.as_args())
        row = 0
        for prompt, response in zip(prompts, responses):
            alone = side_inputs([prompt], [response], trainer.pad_id, "right", torch.device("cpu"))
            expected = crisp.response_hidden(*alone.as_args())
            torch.testing.assert_close(hidden[row:row + len(response)], expected, rtol=1e-10, atol=1e-10)
            row += len(response)
    assert row == hidden.shape[0]


def test_cu_seq_lens_from_positions():
    positions = torch.tensor([[0, 1, 2, 0, 0, 1, 2, 3]])
    assert cu_seq_lens_from_positions(positions).tolist() == [0, 3, 4, 8]
    with pytest.raises(ValueError, match="start at 0"):
        cu_seq_lens_from_positions(torch.tensor([[1, 2, 0]]))
    with pytest.raises(ValueError, match=r"\[1, L\]"):
        cu_seq_lens_from_positions(torch.zeros(2, 3, dtype=torch.long))


def test_packing_with_an_attention_that_cannot_confine_fails_before_loading(tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the packing check")

    monkeypatch.setattr(loop_module, "load_model", no_loading)
    with pytest.raises(ValueError, match="flex_attention") as error:
        make_trainer(tmp_path, "bad", ["model.attn_implementation=flex_attention", "train.packing=true"])
    assert "train.packing" in str(error.value)


def test_packing_with_eager_is_exact_too(tmp_path, seed):
    common = ["train.teacher_refresh_every=1", "model.seed=3", "model.attn_implementation=eager"]
    padded = make_trainer(tmp_path, "eager-padded", common + ["train.packing=false"], data_seed=seed)
    packed = make_trainer(tmp_path, "eager-packed", common + ["train.packing=true"], data_seed=seed)
    pairs = padded.stream.take(2)
    generations = generations_of_different_lengths(4, len(padded.tokenizer), padded.tokenizer.eos_token_id)
    loss_padded = padded.train_on_rollouts(pairs, generations)["loss"]
    loss_packed = packed.train_on_rollouts(pairs, generations)["loss"]
    assert loss_packed == pytest.approx(loss_padded, rel=1e-6)
