"""Reproduce the demo's base checkpoint (crisp_fast/demo/assets/base) by supervised fine-tuning.

    PYTHONPATH=. python -m crisp_fast.demo.make_base [--steps 900] [--out crisp_fast/demo/assets/base]

Deterministic for a given seed and thread count (1 thread by default; both stages take ~4 minutes
on a quiet 2-core machine).
The model learns two behaviours from one set of weights:

* ordinary prompt (the student's context): the VERBOSE solution (a preamble and a final re-check
  each 75% of the time, restatements after ~70% of the steps, the answer), every token trained;
* the conciseness instruction (the teacher's context, header replaced as the trainer does):
  responses that are random mixtures of verbose and concise, where the first character of every
  redundant line is NOT trained (label -100) and everything else is. So the teacher learns to
  finish any redundant line it is shown, yet at every line start, whatever came before, its
  choice is the next necessary line or the answer: the local, per-step preference that CRISP's
  teacher scores the student's verbose rollouts with.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import random
import time

import torch
from transformers import GenerationConfig, Qwen3ForCausalLM

from crisp_fast.demo import world
from crisp_fast.demo.model import BASE_DIR, deterministic, evaluate, prompt_ids, tiny_qwen3_config
from crisp_fast.demo.tokenizer import build_tokenizer

IGNORE = -100
TRAIN_SEED_OFFSET = 1_000_003  # training problems come from streams the held-out sets never use


def example(tokenizer, problem: world.Problem, rng: random.Random, *, instructed: bool):
    """(input_ids, labels) for one SFT example."""
    if instructed:
        segments = world.solution_segments(problem, rng, preamble=rng.random() < 0.5,
                                           final_check=rng.random() < 0.5, step_prob=rng.random())
    else:
        segments = world.verbose_segments(problem, rng)
    prompt = prompt_ids(tokenizer, problem, instructed=instructed)
    response, labels = [], []
    for index, (line, redundant) in enumerate(segments):
        text = line if index == len(segments) - 1 else line + "\n"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        line_labels = list(ids)
        if instructed and redundant:
            line_labels[0] = IGNORE  # the teacher never learns to START a redundant line
        response += ids
        labels += line_labels
    response.append(tokenizer.eos_token_id)
    labels.append(tokenizer.eos_token_id)
    return prompt + response, [IGNORE] * len(prompt) + labels


def batch(tokenizer, rng: random.Random, size: int):
    rows = []
    for index in range(size):
        problem = world.sample_problem(rng, rng.choice(world.LEVELS))
        rows.append(example(tokenizer, problem, rng, instructed=index % 2 == 1))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((size, width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((size, width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((size, width), dtype=torch.long)
    for row, (ids, row_labels) in enumerate(rows):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(ids)] = torch.tensor(row_labels)
        attention_mask[row, :len(ids)] = 1
    return input_ids, attention_mask, labels


def train(steps: int, batch_size: int, lr: float, seed: int, out: pathlib.Path, log_every: int = 25,
          threads: int = 2, save_every: int = 0, init_from: pathlib.Path | None = None) -> dict:
    deterministic(seed, threads)
    tokenizer = build_tokenizer()
    config = tiny_qwen3_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    model = Qwen3ForCausalLM(config) if init_from is None else Qwen3ForCausalLM.from_pretrained(init_from, dtype=torch.float32)
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))))
    rng = random.Random(seed + TRAIN_SEED_OFFSET)
    model.train()
    started = time.time()
    for step in range(1, steps + 1):
        input_ids, attention_mask, labels = batch(tokenizer, rng, batch_size)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - started:6.0f}s", flush=True)
        if save_every and step % save_every == 0:  # partial checkpoints, to look at while it trains
            model.save_pretrained(out.parent / f"{out.name}-step{step}", safe_serialization=True)
            tokenizer.save_pretrained(out.parent / f"{out.name}-step{step}")

    held_out = world.problem_set(seed=seed + 7, per_level=20)
    report = {}
    for instructed in (False, True):
        result = evaluate(model, tokenizer, held_out, instructed=instructed)
        name = "instructed" if instructed else "plain"
        report[name] = {"overall": result["overall"], "by_difficulty": result["by_difficulty"]}
        print(name, json.dumps(report[name]["overall"]), flush=True)
        for sample in result["samples"][:3]:
            print("   ", repr(sample["response"]))
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                               do_sample=False, max_new_tokens=160)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    meta = {"init_from": str(init_from) if init_from else None, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "threads": torch.get_num_threads(),
            "wall_seconds": round(time.time() - started, 1), "held_out_greedy": report}
    (out / "make_base.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=450)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=BASE_DIR)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it; 1 is what shipped)")
    parser.add_argument("--init-from", type=pathlib.Path, default=None, help="continue from this checkpoint (a second stage)")
    parser.add_argument("--save-every", type=int, default=0, help="also save partial checkpoints next to --out")
    args = parser.parse_args(argv)
    train(args.steps, args.batch_size, args.lr, args.seed, args.out, threads=args.threads, save_every=args.save_every,
          init_from=args.init_from)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
