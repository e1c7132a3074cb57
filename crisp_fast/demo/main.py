"""`crisp-fast demo`: CRISP on the toy addition world, on a CPU, in minutes.

    crisp-fast demo [--out DIR] [--teacher-refresh-every M] [--steps N] [--seed S]
    (or: PYTHONPATH=. python -m crisp_fast.demo.main ...; `make demo`)

1. loads the shipped base (crisp_fast/demo/assets/base: a 0.8M-parameter Qwen3 that writes
   verbose solutions, and concise ones when given the conciseness instruction);
2. evaluates it on held-out problems at every difficulty (greedy, `GENERATION_BUDGET` new tokens);
3. runs CRISP with the project's trainer (`crisp_fast.train.Trainer`: the trainer's prompts and
   chat template, rollouts, teacher snapshot every M steps, the fused reverse KL from hidden
   states, AdamW), the trainer grading each step's rollouts with the world's own checker
   (`world.grade`, passed as the trainer's grader) for the plot;
4. evaluates the trained model the same way and prints a paper-like table; writes
   DIR/summary.json, DIR/demo.png, DIR/metrics.jsonl and the trained model (DIR/train/hf).
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import time

import torch

from crisp_fast.demo import world
from crisp_fast.demo.model import BASE_DIR, GENERATION_BUDGET, deterministic, evaluate, load_base

HELD_OUT_SEED = 20_000  # held-out problems; the training problems use TRAIN_SEED
TRAIN_SEED = 30_000


def demo_config(out: pathlib.Path, data_path: pathlib.Path, args) -> "Config":
    """The trainer configuration of the demo, in the trainer's own format."""
    from crisp_fast.train import load_config

    base = {
        "out": str(out),
        "model": {"source": str(args.base), "tokenizer": "", "dtype": "float32", "attn_implementation": "sdpa",
                  "activation_checkpointing": "off", "liger": "off"},
        "data": {"path": str(data_path), "field": "problem", "max_prompt_tokens": 128},
        "prompts": {"placement": "header", "student_header": world.STUDENT_HEADER,
                    "teacher_instruction": world.TEACHER_INSTRUCTION, "answer_format": world.ANSWER_FORMAT},
        "rollout": {"engine": "hf", "n": 1, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                    "max_new_tokens": GENERATION_BUDGET},
        "train": {"steps": args.steps, "prompts_per_step": args.prompts_per_step, "micro_batch_tokens": 8192,
                  "lr": args.lr, "betas": [0.9, 0.999], "weight_decay": 0.01, "grad_clip": 1.0,
                  "teacher_refresh_every": args.teacher_refresh_every, "loss_backend": args.loss_backend,
                  "seed": args.seed, "log_teacher_entropy": True, "threads": args.threads},
        "checkpoint": {"every": 0, "resume": "never", "export_hf": True},
        "log": {"tensorboard": "off", "progress": False},
    }
    return load_config(None, [], base=base)


def world_grader(responses: list[str], records: list[dict]) -> list[bool]:
    """The trainer's grader for the demo: the world's exact `Answer: N` last line."""
    return [world.grade(response, int(record["answer"])) for response, record in zip(responses, records)]


def reduction(base_tokens: float, crisp_tokens: float) -> float:
    return 1.0 - crisp_tokens / base_tokens if base_tokens else 0.0


def comparison(base: dict, crisp: dict) -> dict:
    def pair(b, c):
        return {"base": {"accuracy": b["accuracy"], "mean_tokens": b["mean_tokens"]},
                "crisp": {"accuracy": c["accuracy"], "mean_tokens": c["mean_tokens"]},
                "reduction": reduction(b["mean_tokens"], c["mean_tokens"]), "n": b["n"]}

    return {"overall": pair(base["overall"], crisp["overall"]),
            "by_difficulty": {level: pair(base["by_difficulty"][level], crisp["by_difficulty"][level])
                              for level in base["by_difficulty"]}}


def table(result: dict) -> str:
    lines = [f"{'numbers':>8} | {'base acc':>8} {'base tok':>8} | {'CRISP acc':>9} {'CRISP tok':>9} | {'reduction':>9}",
             "-" * 64]
    rows = [(f"k={level}", row) for level, row in result["by_difficulty"].items()] + [("overall", result["overall"])]
    for name, row in rows:
        lines.append(f"{name:>8} | {100 * row['base']['accuracy']:7.1f}% {row['base']['mean_tokens']:8.1f} | "
                     f"{100 * row['crisp']['accuracy']:8.1f}% {row['crisp']['mean_tokens']:9.1f} | "
                     f"{100 * row['reduction']:8.1f}%")
    return "\n".join(lines)


def plot(path: pathlib.Path, history: list[dict], result: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(steps, [h["mean_response_tokens"] for h in history], label="rollout mean tokens")
    axes[0].set_xlabel("CRISP step"), axes[0].set_ylabel("tokens"), axes[0].set_title("response length (rollouts, T=1)")
    twin = axes[0].twinx()
    twin.plot(steps, [100 * h["accuracy"] for h in history], color="tab:green", label="rollout accuracy")
    twin.set_ylabel("accuracy %"), twin.set_ylim(0, 105)
    axes[1].plot(steps, [h["kl"] for h in history], label="KL (mean per token)")
    axes[1].plot(steps, [h["student_entropy"] for h in history], label="student entropy")
    axes[1].set_xlabel("CRISP step"), axes[1].set_title("loss"), axes[1].legend()
    levels = list(result["by_difficulty"])
    x = range(len(levels))
    width = 0.38
    for offset, side, color in ((-width / 2, "base", "tab:gray"), (width / 2, "crisp", "tab:blue")):
        bars = axes[2].bar([i + offset for i in x], [result["by_difficulty"][l][side]["mean_tokens"] for l in levels],
                           width, label=side, color=color)
        for bar, level in zip(bars, levels):
            axes[2].annotate(f"{100 * result['by_difficulty'][level][side]['accuracy']:.0f}%",
                             (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    axes[2].set_xticks(list(x), [f"k={l}" for l in levels])
    axes[2].set_ylabel("mean tokens (held-out, greedy)"), axes[2].set_title("per difficulty (labels: accuracy)")
    axes[2].legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(args) -> dict:
    started = time.time()
    deterministic(args.seed, args.threads)
    from tqdm import tqdm

    from crisp_fast.train import Trainer

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    data_path = out / "train_problems.jsonl"
    with data_path.open("w") as handle:
        for problem in world.problem_set(TRAIN_SEED + args.seed, per_level=250):
            handle.write(json.dumps({"problem": problem.text, "answer": problem.answer}) + "\n")
    held_out = world.problem_set(HELD_OUT_SEED + args.seed, per_level=args.eval_per_level)
    eval_kwargs = dict(max_new_tokens=GENERATION_BUDGET, temperature=args.eval_temperature, seed=args.seed)

    base_model, tokenizer = load_base(args.base)
    print(f"evaluating the base on {len(held_out)} held-out problems ...", flush=True)
    base_report = evaluate(base_model, tokenizer, held_out, **eval_kwargs)
    del base_model

    trainer = Trainer(demo_config(out / "train", data_path, args), grader=world_grader)
    history = []
    with (out / "metrics.jsonl").open("w") as log, tqdm(total=args.steps, desc="CRISP", unit="step") as bar:
        while trainer.step < args.steps:
            metrics = trainer.train_step()
            history.append(metrics)
            log.write(json.dumps(metrics) + "\n")
            bar.set_postfix(tokens=f"{metrics['mean_response_tokens']:.0f}", acc=f"{metrics['accuracy']:.2f}",
                            kl=f"{metrics['kl']:.3f}")
            bar.update(1)
    trainer.export(out / "train" / "hf")
    print(f"evaluating the CRISP model on {len(held_out)} held-out problems ...", flush=True)
    crisp_report = evaluate(trainer.model.lm, tokenizer, held_out, **eval_kwargs)

    result = comparison(base_report, crisp_report)
    result.update({
        "wall_seconds": round(time.time() - started, 1),
        "settings": {"steps": args.steps, "prompts_per_step": args.prompts_per_step, "lr": args.lr,
                     "teacher_refresh_every": args.teacher_refresh_every, "seed": args.seed, "threads": args.threads,
                     "eval": f"{'greedy' if args.eval_temperature == 0 else f'T={args.eval_temperature}'}, "
                             f"{GENERATION_BUDGET} new tokens, {args.eval_per_level} problems per level",
                     "base": str(args.base)},
        "training": {"first": history[0], "last": history[-1], "skipped_steps": sum(h["skipped"] for h in history),
                     "teacher_refreshes": list(trainer.teacher.refreshes)},
        "samples": {"base": base_report["samples"], "crisp": crisp_report["samples"]},
    })
    (out / "summary.json").write_text(json.dumps(result, indent=1) + "\n")
    title = (f"CRISP demo: M={args.teacher_refresh_every}, {args.steps} steps x {args.prompts_per_step} prompts; "
             f"overall {100 * result['overall']['reduction']:.0f}% fewer tokens")
    plot(out / "demo.png", history, result, title)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="crisp-fast demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=None, help="run folder (default: runs/demo-<time>)")
    parser.add_argument("--teacher-refresh-every", type=int, default=50,
                        help="M: 0 frozen teacher, 1 the live student, M > 1 refresh every M steps (default 50, the paper's)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--prompts-per-step", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-4,
                        help="far above the paper's 1e-6 (a 0.8M model, 40 steps); 1e-3 wrecks the base in 2 steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (fixed for determinism; 1 is fastest for this tiny model on a busy CPU)")
    parser.add_argument("--eval-per-level", type=int, default=40)
    parser.add_argument("--eval-temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--loss-backend", default="auto")
    parser.add_argument("--base", type=pathlib.Path, default=BASE_DIR)
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = pathlib.Path("runs") / f"demo-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    print(f"crisp-fast demo: writing to {args.out}", flush=True)
    result = run(args)
    print()
    print(table(result))
    print(f"\nM = {args.teacher_refresh_every}; wall time {result['wall_seconds']:.0f} s; "
          f"summary: {args.out / 'summary.json'}; plot: {args.out / 'demo.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
