"""`crisp-fast train --config FILE [--out DIR] [section.key=value ...]`

One process:   crisp-fast train --config configs/tiny.yaml --out runs/tiny
Many GPUs:     torchrun --nproc-per-node 8 -m crisp_fast.train --config configs/qwen3-8b.yaml --out runs/8b
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from crisp_fast.train.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crisp-fast train", description="CRISP self-distillation training")
    parser.add_argument("--config", required=True, help="YAML file (see configs/)")
    parser.add_argument("--out", default=None, help="output directory (default: the config's `out`)")
    parser.add_argument("--export-only", action="store_true",
                        help="load the latest checkpoint in --out and export HF safetensors, without training")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=10")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, list(args.overrides))
        if args.out is not None:  # a folder name, taken literally (never YAML: "010" is not 8)
            if not args.out:
                raise ConfigError("--out must name the output folder")
            config = dataclasses.replace(config, out=args.out)
    except (ConfigError, ValueError) as error:
        print(f"crisp-fast train: {error}", file=sys.stderr)
        return 2
    from crisp_fast.train.checkpoint import CheckpointError
    from crisp_fast.train.data import DataError
    from crisp_fast.train.loop import Trainer

    try:
        trainer = Trainer(config)
        if args.export_only:
            if trainer.maybe_resume() is None:
                print("crisp-fast train: no checkpoint to export", file=sys.stderr)
                return 1
            print(f"exported to {trainer.export()}")
            return 0
        result = trainer.run()
    except (DataError, CheckpointError, ValueError) as error:
        print(f"crisp-fast train: {error}", file=sys.stderr)
        return 2
    if trainer.rank == 0 and result.history:
        last = result.history[-1]
        print(f"done: {len(result.history)} steps, last loss {last['loss']:.5g}, "
              f"mean response {last['mean_response_tokens']:.1f} tokens -> {config.out}")
    return 0
