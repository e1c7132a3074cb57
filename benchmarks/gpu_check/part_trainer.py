"""GPU-check part: CRISP trainer steps through the real `Trainer` on a tiny Qwen3 with the real
vocabulary (V = 151,936), built from a config, bf16 compute (mixed_precision=bf16 over fp32 master
weights), rollouts from HF generate (or vLLM).

    python -m benchmarks.gpu_check.part_trainer --engine hf --device cuda

The built-in character tokenizer encodes the prompts; the model's embedding and lm_head have the
full Qwen3 vocabulary, so the sampled responses (and the fused loss) run over 151,936 logits per
token exactly as with Qwen3-8B, at a fraction of its depth and width. The first step includes the
Triton compilation; the second is the steady state. One ROW per step; the part fails if a loss or
gradient norm is not finite, a step was skipped, no response token was trained on, or the lm_head
did not move. With --engine vllm the built model is saved to a temporary folder first (vLLM loads
an architecture from a path), and the part is skipped when vllm is not importable.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import tempfile
from pathlib import Path

from benchmarks.gpu_check.runner import emit

STEP_FIELDS = ("step", "loss", "kl", "student_entropy", "teacher_entropy", "grad_norm", "skipped", "responses",
               "response_tokens", "micro_batches", "stop_fraction", "rollout_seconds", "train_seconds", "step_seconds",
               "train_tokens_per_second", "peak_memory_bytes")


def build_config(work: Path, args, *, source: str | None = None):
    from crisp_fast.train.tiny import tiny_config, write_problems

    data = write_problems(work / "problems.jsonl", count=max(4 * args.prompts, 16), seed=args.seed)
    overrides = [f"model.dtype={args.dtype}", f"model.mixed_precision={args.mixed_precision}", f"train.loss_backend={args.loss_backend}",
                 f"train.steps={args.steps}", f"train.prompts_per_step={args.prompts}",
                 f"train.micro_batch_tokens={args.micro_batch_tokens}", f"train.seed={args.seed}",
                 f"rollout.n={args.samples}", f"rollout.max_new_tokens={args.new_tokens}",
                 f"rollout.engine={args.engine}", "train.lr=1.0e-3"]
    if source is not None:
        overrides += [f"model.source={source}", f"model.tokenizer={source}"]
    build = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                 num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=args.hidden // 4, max_position_embeddings=1024)
    return tiny_config(data, work / "out", overrides, **build)


def save_built_model(config, path: Path) -> None:
    """The built model and its tokenizer as a HF folder, for engines that load from a path."""
    import torch

    from crisp_fast.train.modeling import load_model, load_tokenizer

    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, tokenizer, torch.device("cpu"))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    parser.add_argument("--device", choices=("cpu", "cuda"), required=True)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--mixed-precision", choices=("auto", "bf16", "off"), default="auto",
                        help="model.mixed_precision: bf16 = bf16 compute over the master weights (FSDP2's policy)")
    parser.add_argument("--loss-backend", default="auto")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--micro-batch-tokens", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.engine == "vllm":
        if args.device != "cuda":
            emit("RESULT", {"status": "skipped", "reason": "vLLM rollouts need a CUDA GPU"})
            return 0
        if importlib.util.find_spec("vllm") is None:
            emit("RESULT", {"status": "skipped", "reason": "vllm is not importable here (not on the image, and "
                                                           "its wheels are far over what the device tool carries)"})
            return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        emit("RESULT", {"status": "failed", "reason": "--device cuda but torch sees no CUDA device"})
        return 1
    from crisp_fast.train import Trainer

    with tempfile.TemporaryDirectory(prefix="gpu-check-trainer-") as folder:
        work = Path(folder)
        config = build_config(work, args)
        if args.engine == "vllm":
            save_built_model(config, work / "model")
            config = build_config(work, args, source=str(work / "model"))
        trainer = Trainer(config, work / "out")
        head = trainer.model.lm.get_output_embeddings().weight
        head_before = _local(head).float().clone()
        problems = []
        for _ in range(args.steps):
            metrics = trainer.train_step()
            row = {key: metrics.get(key) for key in STEP_FIELDS}
            row.update(engine=args.engine, vocab=args.vocab, hidden=args.hidden, dtype=args.dtype,
                       mixed_precision=args.mixed_precision)
            emit("ROW", row)
            for key in ("loss", "grad_norm"):
                if not math.isfinite(float(metrics[key])):
                    problems.append(f"step {metrics['step']}: {key} = {metrics[key]}")
            if metrics["skipped"]:
                problems.append(f"step {metrics['step']} was skipped (gradient not finite)")
            if not metrics["response_tokens"]:
                problems.append(f"step {metrics['step']}: no response token trained on")
        moved = float((_local(head).float() - head_before).abs().max())
        if not moved > 0:
            problems.append("the lm_head weight did not change over the steps")
        summary = {"device": args.device, "engine": args.engine, "loss_backend": args.loss_backend,
                   "dtype": args.dtype, "mixed_precision": args.mixed_precision,
                   "parameter_dtype": str(head.dtype).split(".")[-1], "model_class": type(trainer.model).__name__,
                   "parameters": sum(p.numel() for p in trainer.model.parameters()),
                   "lm_head_max_change": moved,
                   "liger_patches": _liger_patched(trainer.model.lm)}
    emit("RESULT", {"status": "failed" if problems else "ok", "reason": "; ".join(problems), **summary})
    return 0


def _local(parameter):
    """This rank's values of a parameter: the local shard of an FSDP2 DTensor (all of it on one rank)."""
    tensor = parameter.detach()
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _liger_patched(lm) -> bool:
    """Whether Liger's model patches (RMSNorm and friends) replaced the HF modules' forward."""
    norm = getattr(lm.get_decoder(), "norm", None)
    return norm is not None and "liger" in type(norm).__module__.lower() + str(getattr(norm, "forward", "")).lower()


if __name__ == "__main__":
    sys.exit(main())
