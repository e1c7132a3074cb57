"""Tests of the demo (crisp_fast/demo): the world's grader, the shipped base checkpoint, and a few
CRISP steps on it through the project's trainer. Budget: ~1 minute on 2 CPU cores."""
import json
import random

import pytest
import torch

from crisp_fast.demo import world

ASSET_MISSING = not (world.__file__ and (__import__("pathlib").Path(world.__file__).parent / "assets" / "base" / "config.json").is_file())


# ------------------------------------------------------------------------------------------ grader
@pytest.mark.parametrize("response, answer, expected", [
    ("3+5=8\nAnswer: 8", 8, True),
    ("Answer: 8", 8, True),
    ("3+5=8\nAnswer: 8\n", 8, True),              # trailing newline is fine
    ("3+5=8\n  Answer: 8  ", 8, True),            # surrounding spaces on the line are fine
    ("3+5=8\nAnswer: 9", 8, False),               # wrong number
    ("3+5=8\nAnswer: 8\nso far 8", 8, False),     # the answer is not the last line
    ("3+5=8\nAnswer:8", 8, False),                # no space: not the format
    ("3+5=8\nanswer: 8", 8, False),               # case matters
    ("3+5=8\nAnswer: 8.0", 8, False),             # not an integer
    ("3+5=8\nAnswer: 08x", 8, False),
    ("3+5=8\nAnswer: ", 8, False),                # empty answer
    ("3+5=8", 8, False),                          # no answer line
    ("", 8, False),
    ("\n\n", 8, False),
    ("Answer: 8 Answer: 8", 8, False),
    ("Answer: -3", -3, True),
    ("Answer: 12\nAnswer: 13", 13, True),         # the last answer line counts
    ("Answer: 12\nAnswer: 13", 12, False),
])
def test_grader_hand_written_cases(response, answer, expected):
    assert world.grade(response, answer) is expected


def test_grader_on_world_solutions(seed):
    rng = random.Random(seed)
    for level in world.LEVELS:
        problem = world.sample_problem(rng, level)
        verbose = world.verbose_solution(problem, rng)
        concise = world.concise_solution(problem)
        assert world.grade(verbose, problem) and world.grade(concise, problem)
        assert len(concise) < len(verbose)
        # the concise solution is exactly the necessary lines of the verbose one, in order
        assert [line for line in verbose.splitlines() if line in concise.splitlines()] == concise.splitlines()
        wrong = concise.rsplit("Answer: ", 1)[0] + f"Answer: {problem.answer + rng.randint(1, 9)}"
        assert not world.grade(wrong, problem)
        assert world.parse_problem(problem.text) == problem
        assert sum(problem.numbers) == problem.answer and problem.level == level


def test_world_rejects_bad_inputs():
    with pytest.raises(ValueError, match="level"):
        world.sample_problem(random.Random(0), 1)
    for text in ("3+", "12+3", "3*4", "", "0+3"):
        with pytest.raises(ValueError, match="not a demo problem"):
            world.parse_problem(text)


def test_fixed_overhead_makes_easy_solutions_relatively_more_redundant(seed):
    """The property the difficulty-adaptive claim rests on: with the fixed overhead the redundant
    share falls with difficulty (~75% at k=2, ~64% at k=5); without it, it RISES with difficulty
    (~29% -> ~41%: the answer line is a fixed necessary part), so the claim could go either way."""
    rng = random.Random(seed)

    def redundant_share(level, fixed_overhead):
        total = redundant = 0
        for _ in range(400):
            problem = world.sample_problem(rng, level)
            verbose = world.verbose_solution(problem, rng, fixed_overhead=fixed_overhead)
            total += len(verbose)
            redundant += len(verbose) - len(world.concise_solution(problem))
        return redundant / total

    with_overhead = [redundant_share(level, True) for level in (2, 5)]
    without = [redundant_share(level, False) for level in (2, 5)]
    assert with_overhead[0] > with_overhead[1] + 0.06
    assert without[0] < without[1] - 0.06


# ------------------------------------------------------------------------------- shipped checkpoint
@pytest.mark.skipif(ASSET_MISSING, reason="run python -m crisp_fast.demo.make_base to build the base")
def test_shipped_base_loads_with_plain_transformers_and_writes_the_world_format():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from crisp_fast.demo.model import BASE_DIR, prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(BASE_DIR)
    model = AutoModelForCausalLM.from_pretrained(BASE_DIR)
    assert model.config.model_type == "qwen3" and model.config.head_dim == 32
    problems = world.problem_set(seed=123, per_level=2)
    for instructed in (False, True):
        prompts = [prompt_ids(tokenizer, problem, instructed=instructed) for problem in problems]
        width = max(map(len, prompts))
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
        attention_mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=160, do_sample=False,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
        graded = [world.grade(text, problem) for text, problem in zip(texts, problems)]
        assert all(world.extract_answer(text) is not None for text in texts), texts
        assert sum(graded) >= len(graded) - 2, texts
        # plain prompt: verbose (redundant lines beyond the necessary sums and the answer); with the
        # instruction: concise (exactly the necessary lines and the answer)
        concise = [text.strip() == world.concise_solution(problem) for text, problem in zip(texts, problems)]
        has_preamble = [text.startswith(world.PREAMBLE) for text in texts]
        if instructed:
            assert sum(concise) >= len(concise) - 1 and not any(has_preamble), texts
        else:
            # the preamble is written 75% of the time in training, so greedy decoding usually starts with it
            assert not any(concise) and sum(has_preamble) >= len(texts) // 2, texts


# ------------------------------------------------------------------------------ CRISP on the base
@pytest.mark.skipif(ASSET_MISSING, reason="run python -m crisp_fast.demo.make_base to build the base")
def test_a_few_crisp_steps_shorten_the_rollouts(tmp_path, seed):
    from crisp_fast.demo import main as demo

    args = demo.main.__globals__["argparse"].Namespace(
        out=tmp_path / "run", teacher_refresh_every=0, steps=4, prompts_per_step=8, lr=1e-3, seed=seed % 1000,
        threads=1, eval_per_level=2, eval_temperature=0.0, loss_backend="torch", base=demo.BASE_DIR)
    result = demo.run(args)
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 4
    assert all(torch.isfinite(torch.tensor(h["kl"])) and h["kl"] >= 0 for h in history)
    assert history[0]["kl"] > 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["by_difficulty"]) == {str(level) for level in world.LEVELS}
    for row in [summary["overall"], *summary["by_difficulty"].values()]:
        assert 0 <= row["base"]["accuracy"] <= 1 and 0 <= row["crisp"]["accuracy"] <= 1
        assert row["reduction"] == pytest.approx(1 - row["crisp"]["mean_tokens"] / row["base"]["mean_tokens"])
    # the verbose student and the concise teacher disagree at the redundant lines; a few steps at a
    # high learning rate must shorten the greedy responses on the held-out problems (the sampled
    # rollouts are too few and too varied to compare step by step)
    assert summary["overall"]["crisp"]["mean_tokens"] < 0.9 * summary["overall"]["base"]["mean_tokens"]
    assert (tmp_path / "run" / "demo.png").stat().st_size > 0
    assert result["overall"] == summary["overall"]
