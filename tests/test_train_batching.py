"""Micro-batch planning (padded and packed budgets) and activation checkpointing decided per step
from the micro-batch sizes. Budget: ~15 s on 2 CPU cores."""
import random

import pytest

from crisp_fast.generation import Generation
from crisp_fast.train import Trainer
from crisp_fast.train.batching import micro_batch_tokens, packed_side_inputs, plan_micro_batches
from crisp_fast.train.tiny import tiny_config, write_problems


@pytest.mark.parametrize("packed", [False, True])
def test_micro_batch_plan_respects_budget_and_covers_every_row(seed, packed):
    lengths = [random.randint(1, 60) for _ in range(random.randint(1, 50))]
    budget = random.randint(30, 300)
    groups = plan_micro_batches(lengths, budget, packed=packed)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        sizes = [lengths[i] for i in group]
        cost = sum(sizes) if packed else len(sizes) * max(sizes)
        assert len(group) == 1 or cost <= budget
        assert micro_batch_tokens(sizes, packed) == cost


def test_packed_budget_counts_real_tokens_only():
    # one long row and many short ones: padded, each short row costs the long row's length
    lengths = [100] + [10] * 9
    assert len(plan_micro_batches(lengths, 190, packed=True)) == 1  # 190 real tokens
    assert len(plan_micro_batches(lengths, 190, packed=False)) == 2  # [100, 10] would be 2 x 100


def test_packed_side_inputs_layout(seed):
    prompts = [[random.randint(4, 50) for _ in range(random.randint(1, 5))] for _ in range(3)]
    responses = [[random.randint(4, 50) for _ in range(random.randint(1, 5))] for _ in range(3)]
    inputs = packed_side_inputs(prompts, responses, "cpu")
    rows = [p + r[:-1] for p, r in zip(prompts, responses)]
    assert inputs.input_ids[0].tolist() == [token for row in rows for token in row]
    assert inputs.position_ids[0].tolist() == [i for row in rows for i in range(len(row))]
    # gathered position j of each response holds the token just before response token j
    flat, start, k = inputs.input_ids[0].tolist(), 0, 0
    for prompt, response, row in zip(prompts, responses, rows):
        full = prompt + response
        for j in range(len(response)):
            assert int(inputs.gather_index[k]) == start + len(prompt) - 1 + j
            assert flat[int(inputs.gather_index[k])] == full[len(prompt) - 1 + j]
            k += 1
        start += len(row)


def test_activation_checkpointing_auto_follows_the_step_lengths(tmp_path, seed, capsys):
    data = write_problems(tmp_path / "problems.jsonl", count=8, seed=seed)
    trainer = Trainer(tiny_config(data, tmp_path / "out", ["model.activation_checkpointing=auto",
                                                           "train.micro_batch_tokens=4096"]))
    pairs = trainer.stream.take(2)
    vocab = len(trainer.tokenizer)

    def rollouts(length):
        return [Generation(i, 0, [random.randint(4, vocab - 1) for _ in range(length)], "length") for i in range(2)]

    # one packed row: both prompts (the longer context) plus the responses minus their last token
    prompts = sum(max(len(p.student_ids), len(p.teacher_ids)) for p in pairs)
    trainer.config.model.activation_checkpointing_min_tokens = prompts + 20
    layers = list(trainer.model.lm.get_decoder().layers)
    assert trainer.train_on_rollouts(pairs, rollouts(5))["activation_checkpointing"] is False  # prompts + 8
    assert not any(layer.gradient_checkpointing for layer in layers)
    assert trainer.train_on_rollouts(pairs, rollouts(11))["activation_checkpointing"] is True  # prompts + 20
    assert all(layer.gradient_checkpointing for layer in layers)
    assert trainer.train_on_rollouts(pairs, rollouts(30))["activation_checkpointing"] is True
    assert trainer.train_on_rollouts(pairs, rollouts(2))["activation_checkpointing"] is False
    assert not any(layer.gradient_checkpointing for layer in layers)
    output = capsys.readouterr().out
    # logged when the decision changes, not every step
    assert output.count("activation checkpointing on") == 1
    assert output.count("activation checkpointing off") == 2
