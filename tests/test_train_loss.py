"""The trainer's loss, gradient and alignment against naive full-logits references, and proof
that a training step never allocates a tokens x vocab tensor. Budget: ~40 s on 2 CPU cores."""
import copy
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from crisp_fast.generation import Generation
from crisp_fast.train import Trainer
from crisp_fast.train.batching import plan_micro_batches, side_inputs
from crisp_fast.train.tiny import tiny_config, write_problems


def make_trainer(tmp_path, overrides=(), **build):
    data = write_problems(tmp_path / "problems.jsonl", count=8, seed=random.randint(0, 10**6))
    return Trainer(tiny_config(data, tmp_path / "out", list(overrides), **build))


def random_generations(pairs, n, eos, vocab, max_len=10):
    generations = []
    for prompt_index in range(len(pairs)):
        for sample in range(n):
            ids = [random.randint(4, vocab - 1) for _ in range(random.randint(1, max_len))]
            if random.random() < 0.5:
                ids[-1] = eos
            generations.append(Generation(prompt_index, sample, ids, "stop" if ids[-1] == eos else "length"))
    return generations


def perturb_teacher(trainer, scale=0.3):
    """Make the teacher snapshot differ from the student so that the KL is far from 0."""
    for tensor in trainer.teacher.snapshot:
        tensor.add_(scale * tensor.std().nan_to_num(0.1) * torch.randn_like(tensor))


def reference_model_with(lm, tensors):
    """A separately built copy of the HF model holding `tensors` (in parameter order), float64."""
    reference = copy.deepcopy(lm).double().eval()
    for parameter, tensor in zip(reference.parameters(), tensors):
        parameter.data.copy_(tensor.double())
    return reference


def naive_loss(student_lm, teacher_lm, rows, normalization):
    """Full logits of both contexts, log-softmax, KL at the response positions, float64."""
    per_row = []
    for pair, response in rows:
        s_in = torch.tensor([pair.student_ids + response[:-1]])
        t_in = torch.tensor([pair.teacher_ids + response[:-1]])
        log_p = student_lm(s_in).logits[0, len(pair.student_ids) - 1:].log_softmax(-1)
        with torch.no_grad():
            log_q = teacher_lm(t_in).logits[0, len(pair.teacher_ids) - 1:].log_softmax(-1)
        assert log_p.shape[0] == len(response)
        per_row.append((log_p.exp() * (log_p - log_q)).sum(-1))
    if normalization == "token":
        return torch.cat(per_row).sum() / sum(len(r) for r in per_row)
    return torch.stack([r.mean() for r in per_row]).mean()


@pytest.mark.parametrize("normalization,padding", [("token", "right"), ("sequence", "left")])
def test_one_step_loss_and_gradient_match_naive_reference(tmp_path, seed, normalization, padding):
    trainer = make_trainer(tmp_path, ["train.teacher_refresh_every=0", f"train.normalization={normalization}",
                                      f"train.padding_side={padding}", "train.grad_clip=1.0e9",
                                      "train.micro_batch_tokens=64"])
    perturb_teacher(trainer)
    lm = trainer.model.lm
    student_ref = reference_model_with(lm, [p.detach() for p in lm.parameters()])
    teacher_ref = reference_model_with(lm, trainer.teacher.snapshot)
    pairs = trainer.stream.take(3)
    generations = random_generations(pairs, 2, trainer.tokenizer.eos_token_id, len(trainer.tokenizer))
    rows = [(pairs[g.prompt_index], g.token_ids) for g in generations]
    expected = naive_loss(student_ref, teacher_ref, rows, normalization)
    expected.backward()

    captured = {}
    original_step = trainer.optimizer.step

    def capture_then_step(*args, **kwargs):
        captured.update({name: p.grad.detach().clone() for name, p in lm.named_parameters()})
        return original_step(*args, **kwargs)

    trainer.optimizer.step = capture_then_step
    metrics = trainer.train_on_rollouts(pairs, generations)
    assert metrics["micro_batches"] > 1  # the token budget really split the batch
    assert metrics["loss"] == pytest.approx(float(expected.detach()), rel=1e-4, abs=1e-7)
    assert float(expected.detach()) > 1e-3
    for (name, parameter) in student_ref.named_parameters():
        torch.testing.assert_close(captured[name].double(), parameter.grad, rtol=2e-3, atol=1e-7, msg=name)
    assert metrics["response_tokens"] == sum(len(g.token_ids) for g in generations)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_hidden_state_for_response_token_j_is_the_one_that_predicts_it(tmp_path, seed, padding):
    trainer = make_trainer(tmp_path)
    crisp = trainer.model.double().eval()
    prompts = [[random.randint(4, 99) for _ in range(random.randint(1, 7))] for _ in range(4)]
    responses = [[random.randint(4, 99) for _ in range(random.randint(1, 6))] for _ in range(4)]
    inputs = side_inputs(prompts, responses, trainer.pad_id, padding, torch.device("cpu"))
    with torch.no_grad():
        hidden = crisp.response_hidden(*inputs.as_args())
    assert hidden.shape[0] == sum(len(r) for r in responses)
    flat_ids = inputs.input_ids.reshape(-1)
    row = 0
    for prompt, response in zip(prompts, responses):
        full = prompt + response
        for j in range(len(response)):
            # the input token at the gathered position is the one just before response token j
            assert int(flat_ids[inputs.gather_index[row]]) == full[len(prompt) - 1 + j]
            with torch.no_grad():
                alone = crisp.lm.get_decoder()(torch.tensor([full[:len(prompt) + j]])).last_hidden_state[0, -1]
            torch.testing.assert_close(hidden[row], alone, rtol=1e-9, atol=1e-9)
            row += 1


def test_micro_batch_plan_respects_budget(seed):
    lengths = [random.randint(1, 50) for _ in range(random.randint(1, 40))]
    budget = random.randint(20, 200)
    groups = plan_micro_batches(lengths, budget)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        assert len(group) == 1 or len(group) * max(lengths[i] for i in group) <= budget


class AllocationRecorder(TorchDispatchMode):
    """Records the shape of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(value, torch.Tensor):
                self.shapes.append(tuple(value.shape))
        return out


def test_training_step_never_allocates_tokens_by_vocab(tmp_path, seed, monkeypatch):
    vocab, rows_allowed = 2048, 16
    # the torch backend takes row chunks sized by a memory budget; a small one keeps them thin
    monkeypatch.setenv("CRISP_FAST_TORCH_BUDGET_MB", "0.1")
    trainer = make_trainer(tmp_path, ["rollout.max_new_tokens=24", "rollout.n=2", "train.micro_batch_tokens=4096"],
                           vocab_size=vocab)
    hidden_size = trainer.model.lm.config.hidden_size
    recorder = AllocationRecorder()
    with recorder:
        metrics = trainer.train_step()
    assert metrics["response_tokens"] > 2 * rows_allowed  # enough tokens that tokens x V would show
    offenders = [shape for shape in recorder.shapes if vocab in shape
                 and sorted(shape) != sorted((vocab, hidden_size))
                 and torch.Size(shape).numel() // vocab >= rows_allowed]
    assert not offenders, f"tokens x vocab tensors allocated: {offenders[:5]}"
    assert any(vocab in shape for shape in recorder.shapes)  # the recorder did see the vocabulary
