"""A tiny, self-contained configuration (built Qwen3, character tokenizer, short prompts) for
tests, benchmarks and quick experiments; `configs/tiny.yaml` is the same idea as a file."""
from __future__ import annotations

import json
import random
from pathlib import Path

from crisp_fast.train.config import Config, load_config


def write_problems(path: str | Path, count: int = 16, seed: int = 0) -> Path:
    """Short arithmetic problems as JSONL (field "problem")."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for _ in range(count):
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            handle.write(json.dumps({"problem": f"{a}+{b}?" if rng.random() < 0.5 else f"{a}*{b}?"}) + "\n")
    return path


def tiny_config(data_path: str | Path, out: str | Path, overrides: list[str] = (), **build) -> Config:
    """A few-second CPU configuration; `build` overrides model.build keys (e.g. vocab_size=2048)."""
    model_build = {"architecture": "qwen3", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                   "max_position_embeddings": 512, "tie_word_embeddings": False}
    model_build.update(build)
    base = {
        "out": str(out),
        "model": {"source": "build", "build": model_build, "tokenizer": "tiny-char", "activation_checkpointing": "off"},
        "data": {"path": str(data_path), "max_prompt_tokens": 256},
        "prompts": {"student_header": "Solve.", "teacher_instruction": "Be brief.", "answer_format": "End: A=x"},
        "rollout": {"n": 2, "max_new_tokens": 12, "temperature": 1.0},
        "train": {"steps": 2, "prompts_per_step": 2, "micro_batch_tokens": 256, "lr": 1e-3,
                  "teacher_refresh_every": 2, "loss_backend": "torch", "log_teacher_entropy": True},
        "checkpoint": {"every": 0, "resume": "never", "export_hf": False},
        "log": {"tensorboard": "off", "progress": False},
    }
    return load_config(None, list(overrides), base=base)
