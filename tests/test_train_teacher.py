"""The teacher snapshot: the teacher pass gives the logits of a separately built model holding
the snapshot weights, the student's weights come back bit for bit, refreshes happen after steps
M, 2M, ... (never for M = 0), and M = 1 holds no snapshot at all. Budget: ~25 s on 2 CPU cores."""
import copy
import random

import pytest
import torch

from crisp_fast.generation import Generation
from crisp_fast.train import Trainer
from crisp_fast.train.batching import side_inputs
from crisp_fast.train.teacher import local_tensor
from crisp_fast.train.tiny import tiny_config, write_problems


def make_trainer(tmp_path, refresh_every, overrides=()):
    data = write_problems(tmp_path / "problems.jsonl", count=6, seed=random.randint(0, 10**6))
    return Trainer(tiny_config(data, tmp_path / "out", [f"train.teacher_refresh_every={refresh_every}", *overrides]))


def weights(trainer):
    return [local_tensor(p).detach().clone() for p in trainer.model.parameters()]


def one_step(trainer):
    pairs = trainer.stream.take(2)
    generations = [Generation(i, 0, [random.randint(4, 99) for _ in range(random.randint(2, 8))], "length")
                   for i in range(2)]
    return trainer.train_on_rollouts(pairs, generations)


def teacher_logits_and_reference(trainer, reference_weights):
    prompts = [[random.randint(4, 99) for _ in range(random.randint(2, 9))] for _ in range(3)]
    responses = [[random.randint(4, 99) for _ in range(random.randint(1, 5))] for _ in range(3)]
    inputs = side_inputs(prompts, responses, trainer.pad_id, "right", torch.device("cpu"))
    with torch.no_grad(), trainer.teacher.swapped_in():
        hidden, head = trainer.model(*inputs.as_args())
    ours = torch.nn.functional.linear(hidden, head)
    # a separately built model object holding the expected teacher weights
    reference = copy.deepcopy(trainer.model.lm)
    with torch.no_grad():
        for parameter, tensor in zip(reference.parameters(), reference_weights):
            parameter.copy_(tensor)
        logits = reference(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                           position_ids=inputs.position_ids).logits
    return ours, logits.reshape(-1, logits.shape[-1])[inputs.gather_index]


def test_snapshot_teacher_pass_and_refresh_schedule(tmp_path, seed):
    trainer = make_trainer(tmp_path, 3)
    initial = weights(trainer)
    assert trainer.teacher.bytes() == sum(t.numel() * t.element_size() for t in initial)
    history = []
    for step in range(1, 8):
        metrics = one_step(trainer)
        history.append(metrics["teacher_refreshed"])
        student = weights(trainer)
        expected_teacher = student if step in (3, 6) else (initial if step < 3 else teacher_at_refresh)
        if step in (3, 6):
            teacher_at_refresh = student
        for saved, expected in zip(trainer.teacher.snapshot, expected_teacher):
            assert torch.equal(saved, expected)
        if step in (2, 4):
            ours, reference = teacher_logits_and_reference(trainer, expected_teacher)
            torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
            # and the swap gave the student its own weights back, bit for bit
            assert all(torch.equal(a, b) for a, b in zip(weights(trainer), student))
            assert not all(torch.equal(a, b) for a, b in zip(student, expected_teacher))
    assert history == [False, False, True, False, False, True, False]
    assert trainer.teacher.refreshes == [3, 6]


def test_frozen_and_live_teachers(tmp_path, seed):
    frozen = make_trainer(tmp_path / "frozen", 0)
    initial = weights(frozen)
    for _ in range(3):
        assert one_step(frozen)["teacher_refreshed"] is False
    assert all(torch.equal(a, b) for a, b in zip(frozen.teacher.snapshot, initial))
    assert not all(torch.equal(a, b) for a, b in zip(weights(frozen), initial))

    live = make_trainer(tmp_path / "live", 1)
    assert live.teacher.live and live.teacher.bytes() == 0 and live.teacher.snapshot is None
    one_step(live)
    ours, reference = teacher_logits_and_reference(live, weights(live))
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)


def test_swap_restores_student_after_an_error(tmp_path, seed):
    trainer = make_trainer(tmp_path, 5)
    for tensor in trainer.teacher.snapshot:
        tensor.add_(1.0)
    before = weights(trainer)
    with pytest.raises(RuntimeError, match="boom"), trainer.teacher.swapped_in():
        assert all(torch.equal(local_tensor(p), s) for p, s in zip(trainer.model.parameters(), trainer.teacher.snapshot))
        raise RuntimeError("boom")
    assert all(torch.equal(a, b) for a, b in zip(weights(trainer), before))


def test_snapshot_dtype_option(tmp_path, seed):
    trainer = make_trainer(tmp_path, 4, ["train.teacher_snapshot_dtype=bfloat16"])
    assert {t.dtype for t in trainer.teacher.snapshot} == {torch.bfloat16}
    assert trainer.teacher.bytes() == sum(p.numel() for p in trainer.model.parameters()) * 2
