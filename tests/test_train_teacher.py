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
        hidden, copied = trainer.model(*inputs.as_args(), copy_head=True)
    source = trainer.teacher.head_source
    head = trainer.teacher.snapshot_head(hidden.device, hidden.dtype) if source == "snapshot" else copied
    assert source == ("shared" if trainer.teacher.live else "snapshot")
    ours = torch.nn.functional.linear(hidden, head.weight)
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


@pytest.mark.parametrize("snapshot_dtype", ["same", "bfloat16"])  # exchanged in place / stashed
def test_swap_restores_student_after_an_error(tmp_path, seed, snapshot_dtype):
    from crisp_fast.train import teacher as teacher_module

    trainer = make_trainer(tmp_path, 5, [f"train.teacher_snapshot_dtype={snapshot_dtype}"])
    for tensor in trainer.teacher.snapshot:
        tensor.add_(1.0)
    before = weights(trainer)
    teacher = [s.clone() for s in trainer.teacher.snapshot]
    chunk = teacher_module.EXCHANGE_CHUNK_BYTES
    teacher_module.EXCHANGE_CHUNK_BYTES = 4 * random.randint(1, 97)  # many chunks, a ragged last one
    try:
        with pytest.raises(RuntimeError, match="boom"), trainer.teacher.swapped_in():
            assert all(torch.equal(local_tensor(p), s.to(p.dtype)) for p, s in zip(trainer.model.parameters(), teacher))
            raise RuntimeError("boom")
    finally:
        teacher_module.EXCHANGE_CHUNK_BYTES = chunk
    assert all(torch.equal(a, b) for a, b in zip(weights(trainer), before))
    assert all(torch.equal(a, b) for a, b in zip(trainer.teacher.snapshot, teacher))


def test_snapshot_dtype_option(tmp_path, seed):
    trainer = make_trainer(tmp_path, 4, ["train.teacher_snapshot_dtype=bfloat16"])
    assert {t.dtype for t in trainer.teacher.snapshot} == {torch.bfloat16}
    assert trainer.teacher.bytes() == sum(p.numel() for p in trainer.model.parameters()) * 2


def capture_loss_heads(monkeypatch):
    """Record the (student, teacher) lm_head tensors each fused-loss call receives."""
    import crisp_fast.train.modeling as modeling

    seen, original = [], modeling.fused_linear_divergence

    def spy(student_hidden, teacher_hidden, weight, teacher_weight=None, **kwargs):
        seen.append((weight, teacher_weight))
        return original(student_hidden, teacher_hidden, weight, teacher_weight, **kwargs)

    monkeypatch.setattr(modeling, "fused_linear_divergence", spy)
    return seen


@pytest.mark.parametrize("refresh_every", [1, 0, 3])
def test_teacher_head_reaches_the_loss_by_reference(tmp_path, seed, monkeypatch, refresh_every):
    trainer = make_trainer(tmp_path, refresh_every, ["train.log_teacher_entropy=false"])
    seen = capture_loss_heads(monkeypatch)
    one_step(trainer)
    head = trainer.model.lm.get_output_embeddings().weight
    assert seen and all(student is head for student, _ in seen)
    if refresh_every == 1:  # the live teacher: the student's own tensor, the shared-W path
        assert trainer.teacher.head_source == "shared"
        assert all(teacher is None for _, teacher in seen)
    else:  # one process: the snapshot's own head tensor, not a copy of it
        assert trainer.teacher.head_source == "snapshot"
        index = next(i for i, p in enumerate(trainer.teacher.parameters) if p is head)
        assert all(teacher.data_ptr() == trainer.teacher.snapshot[index].data_ptr() for _, teacher in seen)


def test_ema_teacher_updates_after_every_step(tmp_path, seed):
    rate = random.choice([0.1, 0.25, 1.0])
    trainer = make_trainer(tmp_path, 4, [f"train.teacher_ema={rate}"])
    expected = [t.clone() for t in trainer.teacher.snapshot]
    for step in range(1, 4):
        assert one_step(trainer)["teacher_refreshed"] is True
        for saved, old, student in zip(trainer.teacher.snapshot, expected, weights(trainer)):
            torch.testing.assert_close(saved, old + rate * (student - old), rtol=1e-6, atol=1e-7)
            if rate == 1.0:
                assert torch.equal(saved, student)
        expected = [t.clone() for t in trainer.teacher.snapshot]
    assert trainer.teacher.refreshes == [1, 2, 3]


def test_ema_needs_a_snapshot(tmp_path, seed):
    from crisp_fast.train.config import ConfigError

    for bad, message in [("train.teacher_ema=0.5", "teacher_refresh_every=1 is the live student"),
                         ("train.teacher_ema=1.5", r"train.teacher_ema must be in \[0, 1\]")]:
        with pytest.raises(ConfigError, match=message):
            tiny_config(tmp_path / "p.jsonl", tmp_path / "out", ["train.teacher_refresh_every=1", bad])


def test_swap_copies_nothing_model_sized(tmp_path, seed, monkeypatch):
    """The snapshot and the student's shards trade contents through a small buffer: no clone
    during the swap is bigger than one chunk (a stash would clone every parameter)."""
    from crisp_fast.train import teacher as teacher_module

    trainer = make_trainer(tmp_path, 5)
    monkeypatch.setattr(teacher_module, "EXCHANGE_CHUNK_BYTES", 4 * random.randint(8, 64))
    cloned = []
    clone = torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone", lambda self, *a, **k: cloned.append(self.numel()) or clone(self, *a, **k))
    with trainer.teacher.swapped_in():
        pass
    largest = max(p.numel() for p in trainer.model.parameters())
    assert cloned and max(cloned) * 4 <= teacher_module.EXCHANGE_CHUNK_BYTES < largest * 4
