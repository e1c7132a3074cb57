"""End-to-end tests for `crisp-fast eval` (crisp_fast.eval.runner / cli / report): a tiny randomly
initialised Qwen3 with a local character-level tokenizer and chat template (no hub) evaluated on
a few CHAMP problems through the shared HF engine; a scripted engine with known responses checks
the accuracy / length / truncation numbers exactly; quick_eval for the trainer. Budget: ~30 s.

    PYTHONPATH=. pytest tests/test_eval_run.py -q
"""
import json
import os
import random
from statistics import mean

import pytest
import torch

from crisp_fast.eval.cli import eval_main
from crisp_fast.eval.grader import grade_response
from crisp_fast.eval.problems import Problem, load_champ
from crisp_fast.eval.report import summarize
from crisp_fast.eval.runner import EvalConfig, build_prompt_ids, evaluate, quick_eval
from crisp_fast.generation import Generation

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def char_tokenizer():
    """One token per printable ASCII character (unknown characters -> [UNK]), Qwen-style specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
    vocab = {token: index for index, token in enumerate(specials)}
    for character in "\n" + "".join(chr(code) for code in range(32, 127)):
        vocab[character] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="[UNK]", additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_qwen3(tokenizer):
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=4096,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, tie_word_embeddings=True)
    model = Qwen3ForCausalLM(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, model, tokenizer): one tiny random Qwen3 for the module (building it is the slow part)."""
    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    model = tiny_qwen3(tokenizer)
    path = tmp_path_factory.mktemp("tiny_qwen3")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), model, tokenizer


def read_jsonl(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def test_eval_cli_on_champ_with_tiny_qwen3(tiny, tmp_path, seed):
    import champ_dataset

    tiny_model_dir = tiny[0]
    n_problems, n_samples, budget = 3, 2, 12
    out = tmp_path / "run"
    code = eval_main(["--model", tiny_model_dir, "--data", "champ", "--limit", str(n_problems), "--samples",
                      str(n_samples), "--max-new-tokens", str(budget), "--seed", str(seed % 1000), "--out", str(out),
                      "--quiet", "--label", "tiny"])
    assert code == 0
    rows = read_jsonl(out / "samples.jsonl")
    summary = json.loads((out / "summary.json").read_text())

    # every (problem, sample) once, in order, for the first CHAMP problems
    expected_ids = list(champ_dataset.load("v0").problems)[:n_problems]
    assert [(r["problem_id"], r["sample_index"]) for r in rows] == [
        (pid, k) for pid in expected_ids for k in range(n_samples)]
    for row in rows:
        for key in ("response", "tokens", "finish_reason", "boxed_answer", "answer_line", "correct", "answer", "subset"):
            assert key in row
        assert 1 <= row["tokens"] <= budget
        assert row["finish_reason"] in ("stop", "length")
        if row["finish_reason"] == "length":
            assert row["tokens"] == budget
        # the stored verdict is the grader's verdict on the stored response
        assert row["correct"] == grade_response(row["response"], row["answer"]).correct

    # summary numbers recomputed independently from the rows
    per_problem = {}
    for row in rows:
        per_problem.setdefault(row["problem_id"], []).append(row["correct"])
    assert summary["accuracy"] == pytest.approx(mean(sum(v) / len(v) for v in per_problem.values()))
    assert summary["mean_tokens"] == pytest.approx(mean(r["tokens"] for r in rows))
    assert summary["truncation_rate"] == pytest.approx(mean(r["finish_reason"] == "length" for r in rows))
    assert summary["n_problems"] == n_problems and summary["samples_per_problem"] == n_samples
    assert summary["dataset"] == "CHAMP" and summary["model"] == "tiny"
    assert set(summary["by_subset"]) == {r["subset"] for r in rows}
    assert summary["config"]["max_new_tokens"] == budget and summary["config"]["top_k"] == 20


class ScriptedEngine:
    """Stands in for a rollout engine: returns pre-written responses and records its calls."""

    def __init__(self, tokenizer, responses):
        self.tokenizer, self.responses, self.calls = tokenizer, responses, []

    def generate(self, prompt_ids, sampling):
        self.calls.append((prompt_ids, sampling))
        offset = sum(len(p) for p, _ in self.calls[:-1])
        generations = []
        for prompt_index in range(len(prompt_ids)):
            for sample_index in range(sampling.n):
                text, finished = self.responses[(offset + prompt_index, sample_index)]
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                if finished:
                    ids = ids + [self.tokenizer.eos_token_id]
                generations.append(Generation(prompt_index, sample_index, ids, "stop" if finished else "length"))
        random.shuffle(generations)  # the runner must not rely on the engine's order
        return generations


def test_evaluate_numbers_on_scripted_responses(seed):
    """Random right/wrong/unfinished responses with known verdicts: mean@k, pass@k, tokens and
    truncation come out exactly as computed here by hand."""
    rng = random.Random(seed)
    tokenizer = char_tokenizer()
    problems = [Problem(f"p{i}", f"What is {i} + {i}?", [str(2 * i)], subset=rng.choice("ab"), level=str(i % 2))
                for i in range(5)]
    samples = 3
    responses, expected_correct, expected_tokens, expected_length = {}, {}, {}, {}
    for i, problem in enumerate(problems):
        for k in range(samples):
            kind = rng.choice(["right_box", "right_line", "wrong", "truncated"])
            text = {"right_box": f"so \\boxed{{{2 * i}}}", "right_line": f"work\nAnswer: {2 * i}",
                    "wrong": f"Answer: {2 * i + 1}", "truncated": f"thinking about {i} + {i} ="}[kind]
            finished = kind != "truncated"
            responses[(i, k)] = (text, finished)
            expected_correct[(i, k)] = kind.startswith("right")
            expected_tokens[(i, k)] = len(text) + (1 if finished else 0)  # one token per character, + EOS
            expected_length[(i, k)] = not finished
    engine = ScriptedEngine(tokenizer, responses)
    config = EvalConfig(samples=samples, problems_per_call=2, max_new_tokens=64, seed=seed % 1000)
    rows = evaluate(None, tokenizer, problems, config, engine=engine, progress=False)

    assert [call[1].n for call in engine.calls] == [samples] * 3  # 5 problems, 2 per call
    first_sampling = engine.calls[0][1]
    assert (first_sampling.temperature, first_sampling.top_p, first_sampling.top_k) == (0.6, 0.95, 20)
    assert tokenizer.decode(engine.calls[0][0][0]).count("What is 0 + 0?") == 1  # the problem is in the prompt
    assert [(r["problem_id"], r["sample_index"]) for r in rows] == [(p.problem_id, k) for p in problems for k in range(samples)]
    for row, key in zip(rows, [(i, k) for i in range(5) for k in range(samples)]):
        assert row["correct"] is expected_correct[key]
        assert row["tokens"] == expected_tokens[key]
        assert (row["finish_reason"] == "length") is expected_length[key]

    summary = summarize(rows, model="scripted", dataset="toy")
    per_problem = [mean(expected_correct[(i, k)] for k in range(samples)) for i in range(5)]
    assert summary["accuracy"] == pytest.approx(mean(per_problem))
    assert summary["pass_at_k"] == pytest.approx(mean(p > 0 for p in per_problem))
    assert summary["mean_tokens"] == pytest.approx(mean(expected_tokens.values()))
    assert summary["truncation_rate"] == pytest.approx(mean(expected_length.values()))
    for subset in {p.subset for p in problems}:
        members = [i for i, p in enumerate(problems) if p.subset == subset]
        assert summary["by_subset"][subset]["accuracy"] == pytest.approx(mean(per_problem[i] for i in members))
        assert summary["by_subset"][subset]["mean_tokens"] == pytest.approx(
            mean(expected_tokens[(i, k)] for i in members for k in range(samples)))
    assert set(summary["by_level"]) == {"0", "1"}


def test_quick_eval_returns_accuracy_and_tokens(tiny, seed):
    _, model, tokenizer = tiny
    model.train()
    problems = load_champ()[:2]
    accuracy, mean_tokens = quick_eval(model, tokenizer, problems, samples=2, max_new_tokens=8, seed=seed % 1000)
    assert 0.0 <= accuracy <= 1.0
    assert 1.0 <= mean_tokens <= 8.0
    assert model.training  # left as it was
    model.eval()


def test_prompt_ids_use_chat_template_and_template_text():
    tokenizer = char_tokenizer()
    ids = build_prompt_ids(tokenizer, "What is 1+1?", "{problem} Think.")
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\nWhat is 1+1? Think.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    bare = tokenizer.decode(build_prompt_ids(tokenizer, "x", "boxed", chat_template=False))
    assert bare == "x\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    with pytest.raises(ValueError, match="problem"):
        build_prompt_ids(tokenizer, "x", "no placeholder here")


def test_eval_cli_rejects_bad_data_before_loading_the_model(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2", "answer": \n')
    code = eval_main(["--model", str(tmp_path / "no-such-model"), "--data", str(bad)])
    assert code == 2
    assert f"{bad}:2" in capsys.readouterr().err
    code = eval_main(["--model", "x", "--data", "champ", "--top-p", "0"])
    assert code == 2 and "top_p" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "eval_runs")
