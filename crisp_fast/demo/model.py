"""The demo's tiny Qwen3, where its shipped weights live, and greedy/sampled evaluation on the world.

    model, tokenizer = load_base()                 # the shipped SFT base (crisp_fast/demo/assets/base)
    report = evaluate(model, tokenizer, problems)  # accuracy and mean tokens, per level and overall
"""
from __future__ import annotations

import os
import pathlib

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from crisp_fast.demo import world
from crisp_fast.train.prompts import PromptTexts, build_prompts

ASSETS = pathlib.Path(__file__).resolve().parent / "assets"
BASE_DIR = ASSETS / "base"
GENERATION_BUDGET = 160  # new tokens; the longest verbose solution (k = 5) is ~125 characters


def deterministic(seed: int, threads: int = 2) -> None:
    """Same seed, same numbers: fixed thread count, deterministic kernels, seeded generators."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(seed)


def tiny_qwen3_config(vocab_size: int, pad_token_id: int, eos_token_id: int) -> Qwen3Config:
    # ~0.8M parameters; head_dim is set explicitly (Qwen3 would otherwise derive 128 from 4096/32)
    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        rope_theta=10000.0, tie_word_embeddings=True, pad_token_id=pad_token_id,
        eos_token_id=eos_token_id, bos_token_id=None, attention_dropout=0.0,
    )


def load_base(path: str | os.PathLike = BASE_DIR):
    if not (pathlib.Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"no demo base checkpoint at {path}: run `python -m crisp_fast.demo.make_base`")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)  # the shipped base is plain Qwen3
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False)
    model.eval()
    return model, tokenizer


PROMPT_TEXTS = PromptTexts(student_header=world.STUDENT_HEADER, teacher_instruction=world.TEACHER_INSTRUCTION,
                           answer_format=world.ANSWER_FORMAT, placement="header")


def prompt_ids(tokenizer, problem: world.Problem, *, instructed: bool) -> list[int]:
    """The trainer's student (or teacher) prompt for `problem`, through the chat template."""
    student, teacher = build_prompts(tokenizer, problem.text, PROMPT_TEXTS)
    return teacher if instructed else student


@torch.no_grad()
def generate(model, tokenizer, problems, *, instructed: bool = False, max_new_tokens: int = GENERATION_BUDGET,
             batch_size: int = 64, temperature: float = 0.0, seed: int = 0):
    """Responses (text, token count incl. EOS) for each problem; greedy when temperature == 0."""
    was_training = model.training
    model.eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    results = []
    for start in range(0, len(problems), batch_size):
        batch = problems[start:start + batch_size]
        prompts = [prompt_ids(tokenizer, problem, instructed=instructed) for problem in batch]
        width = max(len(ids) for ids in prompts)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompts):  # left padding, so every row ends at the prompt's end
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        sampling = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else dict(do_sample=False)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sampling)
        for row in output[:, width:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[:row.index(tokenizer.eos_token_id) + 1]
            else:
                row = [token for token in row if token != tokenizer.pad_token_id]
            results.append((tokenizer.decode(row, skip_special_tokens=True), len(row)))
    torch.random.set_rng_state(generator_state)
    model.train(was_training)
    return results


def evaluate(model, tokenizer, problems, **generate_kwargs) -> dict:
    """{"overall": {"accuracy", "mean_tokens", "n"}, "by_difficulty": {"<k>": {...}}, "samples": [...]}"""
    responses = generate(model, tokenizer, problems, **generate_kwargs)
    rows = [(problem.level, world.grade(text, problem), tokens, text) for problem, (text, tokens) in zip(problems, responses)]

    def summarise(selected):
        return {"accuracy": sum(ok for _, ok, _, _ in selected) / len(selected),
                "mean_tokens": sum(tokens for _, _, tokens, _ in selected) / len(selected), "n": len(selected)}

    levels = sorted({level for level, *_ in rows})
    return {"overall": summarise(rows),
            "by_difficulty": {str(level): summarise([row for row in rows if row[0] == level]) for level in levels},
            "samples": [{"level": level, "correct": ok, "tokens": tokens, "response": text}
                        for level, ok, tokens, text in rows[:: max(1, len(rows) // 10)]]}
