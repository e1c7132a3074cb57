"""One full training step on fixed rollouts, crisp-fast or TRL 1.16, in a child process that
reports its step time, peak memory over the model and loss.

    python -m benchmarks.trainer_step --trainer crisp --tokens 4096
    python -m benchmarks.trainer_step --trainer crisp --variant lora --tokens 4096
    python -m benchmarks.trainer_step --trainer crisp --variant nopack --tokens 4096
    python -m benchmarks.trainer_step --trainer trl --tokens 4096

Both trainers get the same thing: a tiny Qwen3 (hidden 256, 2 layers, 4 heads / 2 kv heads of
64, untied head) with the real 151,936-token vocabulary, built from the same seed; 2 prompts
(crisp-fast's character tokenizer and its chat template); one fixed response of `--tokens`
random ids per prompt; a frozen teacher that is a perturbed copy of the initial weights (so the
KL is not 0); the teacher sees the student's own context (TRL cannot give it another); fp32 on
CPU; AdamW (lr 1e-4, betas 0.9/0.999, no weight decay), gradient clipping at 1.0; activation
checkpointing off in both unless `--checkpointing on`.

* crisp-fast: `Trainer.train_on_rollouts` (teacher pass with the snapshot swapped in, student
  pass, fused reverse KL from hidden states, backward, AdamW), packing on unless `--variant
  nopack`; `--variant lora` adds adapters (model.lora.*, when this crisp-fast has them).
* TRL: `trl.DistillationTrainer` with `beta=1.0` (reverse KL), `use_cpu=True`, a deep copy of
  the model as its teacher. Only its generation hook `_generate_single_turn` is overridden, to
  return the fixed responses (TRL has no fixed-rollout mode), and `training_step` is wrapped
  to read the loss it returns (its logs round it); its loss
  (`_chunked_divergence_loss`), teacher pass, padding and training loop are its own.

With `--warmup-tokens K` both trainers first take one step on the responses cut to K tokens, so
the measured step is a steady-state one, as every step after the first: AdamW's state exists at
its start. Two memory figures, both from the RSS high-water mark of the measured step (reset
through /proc/self/clear_refs at its start):
  peak_over_start_bytes  minus the RSS at the step's start (model, teacher, AdamW state): what
                         the step itself adds (activations, gradients, loss buffers)
  peak_over_model_bytes  minus the RSS before the first step (model and teacher only): the
                         above plus AdamW's state, i.e. all the training memory beyond the model
Without a warm-up both are the first step's (AdamW's state is created inside it). Prints
`RESULT {json}`.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

import torch

VOCAB = 151936
MODEL = {"architecture": "qwen3", "vocab_size": VOCAB, "hidden_size": 256, "intermediate_size": 768,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
         "max_position_embeddings": 65536, "tie_word_embeddings": False}
PROBLEMS = ["What is 17 * 23? Show your steps.", "A train leaves at 3 pm at 60 km/h; where is it at 5 pm?"]
LR, TEACHER_NOISE = 1e-4, 0.2


def rss(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    return rss("VmRSS")


def fixed_rollouts(tokenizer, tokens: int, seed: int):
    """(messages, prompt ids, response ids) per prompt; responses avoid the special ids (0..3),
    so no EOS cuts them short in either trainer."""
    rng = random.Random(seed)
    rollouts = []
    for problem in PROBLEMS:
        messages = [{"role": "user", "content": problem}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        rollouts.append((messages, list(ids), [rng.randrange(4, VOCAB) for _ in range(tokens)]))
    return rollouts


def perturb_(tensors, seed: int):
    """The teacher: the initial weights plus seeded noise, the same in both trainers."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in tensors:
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
            tensor.add_(TEACHER_NOISE * tensor.float().std().nan_to_num(0.02) * noise.to(tensor.dtype))


def crisp_config(args, out_dir):
    from crisp_fast.train.config import ModelConfig, load_config

    length = max(len(p) for _, p, _ in args.rollouts) + args.tokens
    overrides = []
    if args.loss_workspace_mb:
        overrides.append(f"train.loss_workspace_mb={args.loss_workspace_mb}")
    if args.variant == "lora":
        if "lora" not in {f.name for f in __import__("dataclasses").fields(ModelConfig)}:
            raise RuntimeError("this crisp-fast has no model.lora.* keys (LoRA comes with another branch)")
        overrides += ["model.lora.enabled=true", "model.lora.r=16", "model.lora.alpha=32"]
    base = {
        "out": str(out_dir),
        "model": {"source": "build", "build": dict(MODEL), "tokenizer": "tiny-char", "dtype": "float32",
                  "mixed_precision": "off", "attn_implementation": "sdpa",
                  "activation_checkpointing": args.checkpointing},
        "data": {"path": str(out_dir / "problems.jsonl"), "max_prompt_tokens": 512},
        "rollout": {"n": 1, "max_new_tokens": args.tokens},
        "train": {"steps": 1, "prompts_per_step": len(PROBLEMS), "micro_batch_tokens": 2 * length, "lr": LR,
                  "weight_decay": 0.0, "grad_clip": 1.0, "teacher_refresh_every": 0, "loss_backend": "auto",
                  "log_teacher_entropy": False, "packing": args.variant != "nopack"},
        "checkpoint": {"every": 0, "resume": "never", "export_hf": False},
        "log": {"tensorboard": "off", "progress": False},
    }
    return load_config(None, overrides, base=base)


def run_crisp(args):
    from pathlib import Path

    from crisp_fast.generation import Generation
    from crisp_fast.train import Trainer
    from crisp_fast.train.data import PromptPair
    from crisp_fast.train.tiny import write_problems

    out_dir = Path(tempfile.mkdtemp(prefix="crisp-bench-"))
    write_problems(out_dir / "problems.jsonl", count=4)
    from crisp_fast.train.modeling import tiny_char_tokenizer

    args.rollouts = fixed_rollouts(tiny_char_tokenizer(), args.tokens, args.seed)
    config = crisp_config(args, out_dir)
    before_trainer = rss("VmRSS")
    trainer = Trainer(config)
    if trainer.teacher.snapshot is not None:
        perturb_(trainer.teacher.snapshot, args.seed + 1)
    pairs = [PromptPair(i, ids, ids) for i, (_, ids, _) in enumerate(args.rollouts)]
    generations = [Generation(i, 0, response, "length") for i, (_, _, response) in enumerate(args.rollouts)]
    model_rss = rss("VmRSS")
    if args.warmup_tokens:  # a short step first: AdamW's state exists, as in any step after the first
        trainer.train_on_rollouts(pairs, [Generation(g.prompt_index, 0, g.token_ids[:args.warmup_tokens], "length")
                                          for g in generations])
    start_rss = reset_peak()
    start = time.perf_counter()
    metrics = trainer.train_on_rollouts(pairs, generations)
    seconds = time.perf_counter() - start
    peak = rss("VmHWM") - start_rss
    from crisp_fast.train.memory_plan import plan_memory

    rows = [len(ids) + args.tokens - 1 for _, ids, _ in args.rollouts]
    forward = sum(rows) if config.train.packing else len(rows) * max(rows)
    plan = plan_memory(config, tokens=forward, loss_rows=len(rows) * args.tokens, device="cpu",
                       mode="lora" if args.variant == "lora" else "full",
                       checkpointing=bool(metrics.get("activation_checkpointing")))
    return {"loss": metrics["loss"], "time_s": seconds, "peak_over_start_bytes": peak, "start_rss_bytes": start_rss,
            "peak_over_model_bytes": rss("VmHWM") - model_rss,
            "total_over_before_model_bytes": rss("VmHWM") - before_trainer, "plan_peak_bytes": plan.peak,
            "plan_peak_phase": plan.peak_phase, "warmup_tokens": args.warmup_tokens,
            "micro_batches": metrics["micro_batches"], "activation_checkpointing": metrics.get("activation_checkpointing"),
            "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            "parameters": sum(p.numel() for p in trainer.model.parameters())}


def run_trl(args):
    import copy

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from crisp_fast.train.config import ModelConfig
    from crisp_fast.train.modeling import load_model, tiny_char_tokenizer

    tokenizer = tiny_char_tokenizer()
    tokenizer.padding_side = "left"
    rollouts = fixed_rollouts(tokenizer, args.tokens, args.seed)
    model = load_model(ModelConfig(source="build", build=dict(MODEL), attn_implementation="sdpa"), tokenizer,
                       torch.device("cpu"))
    teacher = copy.deepcopy(model)
    perturb_(list(teacher.parameters()), args.seed + 1)
    by_prompt = {tuple(ids): response for _, ids, response in rollouts}

    class FixedRolloutDistillationTrainer(DistillationTrainer):
        """TRL's trainer, with generation replaced by the fixed responses (nothing else)."""

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
            missing = [ids for ids in prompt_ids if tuple(ids) not in by_prompt]
            if missing:
                raise RuntimeError(f"TRL tokenised a prompt differently from the fixed rollouts: {missing[0][:20]}")
            cut = args.warmup_tokens if args.warmup_tokens and self.state.global_step == 0 else None
            return [list(by_prompt[tuple(ids)][:cut]) for ids in prompt_ids]

        def training_step(self, *args, **kwargs):  # observes the loss it returns, changes nothing
            loss = super().training_step(*args, **kwargs)
            measured["loss"] = float(loss)
            return loss

    measured = {}

    class Measure(TrainerCallback):
        def on_step_begin(self, *_, **__):
            measured.setdefault("model_rss", rss("VmRSS"))  # before the first step: model and teacher
            measured["start_rss"] = reset_peak()
            measured["start"] = time.perf_counter()

        def on_step_end(self, *_, **__):
            measured["time_s"] = time.perf_counter() - measured["start"]
            measured["peak"] = rss("VmHWM") - measured["start_rss"]
            measured["peak_over_model"] = rss("VmHWM") - measured["model_rss"]

    config = DistillationConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"), use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=args.checkpointing == "on", beta=1.0, temperature=1.0, max_steps=2 if args.warmup_tokens else 1,
        per_device_train_batch_size=len(rollouts), gradient_accumulation_steps=1, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        max_completion_length=args.tokens, logging_steps=1, save_strategy="no", report_to=[], seed=args.seed,
        dataloader_num_workers=0, shuffle_dataset=False, disable_dropout=True)
    dataset = Dataset.from_list([{"prompt": messages} for messages, _, _ in rollouts])
    trainer = FixedRolloutDistillationTrainer(model=model, teacher_model=teacher, args=config, train_dataset=dataset,
                                              processing_class=tokenizer, callbacks=[Measure()])
    trainer.train()
    return {"loss": measured["loss"], "time_s": measured["time_s"], "peak_over_start_bytes": measured["peak"],
            "peak_over_model_bytes": measured["peak_over_model"],
            "start_rss_bytes": measured["start_rss"], "warmup_tokens": args.warmup_tokens,
            "trainable_parameters": sum(p.numel() for p in model.parameters()),
            "parameters": sum(p.numel() for p in model.parameters())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trainer", choices=("crisp", "trl"), required=True)
    parser.add_argument("--variant", choices=("full", "nopack", "lora"), default="full")
    parser.add_argument("--tokens", type=int, default=1024, help="response tokens per prompt")
    parser.add_argument("--checkpointing", choices=("off", "on"), default="off")
    parser.add_argument("--prompts", type=int, choices=(1, 2), default=2, help="how many of the 2 prompts")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--warmup-tokens", type=int, default=0,
                        help="both trainers: one step on responses cut to this length first, so the measured step "
                             "is a steady-state one (AdamW's state exists at its start); 0: the first step")
    parser.add_argument("--loss-workspace-mb", type=float, default=0,
                        help="crisp-fast: train.loss_workspace_mb (0: the library default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    del PROBLEMS[args.prompts:]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.trainer == "trl" and args.variant != "full":
        parser.error("--variant applies to crisp-fast only")
    try:
        result = {"status": "ok", **(run_crisp(args) if args.trainer == "crisp" else run_trl(args))}
    except (MemoryError, RuntimeError, ValueError) as error:
        text = str(error)
        oom = isinstance(error, MemoryError) or "can't allocate memory" in text
        result = {"status": "OOM" if oom else "error", "error": text.splitlines()[0][:500] if text else repr(error)}
    result.update({"trainer": args.trainer, "variant": args.variant, "tokens": args.tokens,
                   "checkpointing": args.checkpointing, "threads": torch.get_num_threads()})
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
