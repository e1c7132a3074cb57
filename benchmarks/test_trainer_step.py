"""One full training step on fixed rollouts: crisp-fast against TRL 1.16's DistillationTrainer.

    pytest -q -s benchmarks/test_trainer_step.py            # T = 1,024 / 4,096 / 16,384 response tokens
    pytest -q -s benchmarks/test_trainer_step.py --quick    # T = 256 / 1,024 (a smoke run)

Each measurement is its own process (`benchmarks/trainer_step.py`, whose docstring says exactly
how each trainer is set up: the same tiny real-vocabulary Qwen3, 2 prompts, the same fixed
responses, a perturbed frozen teacher, fp32 CPU, AdamW; TRL keeps its loss, teacher pass and
loop, only its generation hook returns the fixed responses). Variants, activation checkpointing
off in both trainers: crisp-fast packed (default), crisp-fast padded (`nopack`), crisp-fast LoRA
(when this crisp-fast has model.lora.*), TRL; then on in both (crisp-fast's own `auto` turns it
on at these lengths; TRL's `gradient_checkpointing=True`): crisp-fast and its LoRA with a 256 MiB
loss workspace (train.loss_workspace_mb: full-vocabulary row chunks, 4 GEMMs; the decoder MLPs
tiled, model.mlp_tile_tokens), TRL. Each crisp-fast variant is judged against the TRL run with the
same checkpointing, LoRA against full fine-tuning with the same settings. The padded variant runs up to T = 4,096 only (its 16k step takes minutes and
packing's equality with it is shown below that). Every child first takes a warm-up step on
responses cut to 128 tokens, so the measured step is a steady-state one (AdamW's state exists).
Reported: step time; the step's peak RSS over its start (what the step adds: activations,
gradients, loss buffers) and over the model (that plus AdamW's state); the loss. The losses of
crisp-fast and TRL must agree; the targets (at T = 4,096 and 16,384: >= 3x TRL's throughput at
<= 1/8 of its peak; LoRA <= 1/2 of full fine-tuning's peak) are judged on both
memory figures, printed PASS / MISS and saved, not asserted: timings need a quiet machine.
Outputs: benchmarks/results/trainer_step.json (appended), trainer_step.md, trainer_step.png.
"""
from __future__ import annotations

import dataclasses
import os

from benchmarks import harness

QUICK_TOKENS, FULL_TOKENS = [256, 1024], [1024, 4096, 16384]
TARGET_TOKENS = (4096, 16384)
WARMUP_TOKENS = 128
PADDED_MAX_TOKENS = 4096
COLUMNS = [("trainer", "name", ""), ("T", "tokens", "{}"), ("time s", "time_s", "{:.1f}"),
           ("step peak MB", "peak_mb", "{:.0f}"), ("peak over model MB", "model_peak_mb", "{:.0f}"),
           ("loss", "loss", "{:.6g}"), ("status", "status", "")]
MEMORY_FIGURES = (("step peak", "peak_over_start_bytes"), ("peak over model", "peak_over_model_bytes"))


def lora_available() -> bool:
    from crisp_fast.train.config import ModelConfig

    return "lora" in {f.name for f in dataclasses.fields(ModelConfig)}


CKPT = ["--checkpointing", "on", "--loss-workspace-mb", "256"]
# (crisp-fast variant, the TRL run it is judged against): checkpointing off in both, then on in both
JUDGED = (("crisp-fast", "TRL 1.16"), ("crisp-fast ckpt ws256", "TRL 1.16 ckpt"))
# (LoRA, full fine-tuning at the same settings)
LORA_PAIRS = (("crisp-fast LoRA", "crisp-fast"), ("crisp-fast LoRA ckpt ws256", "crisp-fast ckpt ws256"))


def variants():
    lora = lora_available()
    names = [("crisp-fast", ["--trainer", "crisp"]), ("crisp-fast nopack", ["--trainer", "crisp", "--variant", "nopack"])]
    if lora:
        names.append(("crisp-fast LoRA", ["--trainer", "crisp", "--variant", "lora"]))
    names += [("TRL 1.16", ["--trainer", "trl"]), ("crisp-fast ckpt ws256", ["--trainer", "crisp"] + CKPT)]
    if lora:
        names.append(("crisp-fast LoRA ckpt ws256", ["--trainer", "crisp", "--variant", "lora"] + CKPT))
    return names + [("TRL 1.16 ckpt", ["--trainer", "trl", "--checkpointing", "on"])]


def plot(rows, path, subtitle):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(row["name"] for row in rows):
        points = sorted((row["tokens"], row) for row in rows if row["name"] == name and row["status"] == "ok")
        if not points:
            continue
        axes[0].plot([t for t, _ in points], [r["time_s"] for _, r in points], marker="o", label=name)
        axes[1].plot([t for t, _ in points], [r["peak_mb"] for _, r in points], marker="o", label=name)
    for ax, label in zip(axes, ("step time (s)", "the step's peak RSS over its start (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("response tokens per prompt (2 prompts)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    figure.suptitle(subtitle, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def test_trainer_step_against_trl(bench_config, request):
    sizes = QUICK_TOKENS if bench_config.quick else FULL_TOKENS
    if request.config.getoption("--bench-tokens"):  # e.g. --bench-tokens 1024,4096,16384
        sizes = bench_config.tokens
    trl_max = bench_config.baselines_max_tokens  # TRL only up to this T (its 16k step takes long)
    cap = harness.default_memory_cap(bench_config.mem_cap_gib)
    timeout = 1800.0 if bench_config.quick else 4 * 3600.0
    print(f"\none training step on fixed rollouts, tiny Qwen3 with V = 151,936, 2 prompts, T in {sizes}")
    rows = []
    for tokens in sizes:
        for name, args in variants():
            if name.startswith("TRL") and trl_max is not None and tokens > trl_max:
                print(f"  T={tokens} {name}: not run (--bench-baselines-max-tokens {trl_max})", flush=True)
                continue
            if name == "crisp-fast nopack" and tokens > PADDED_MAX_TOKENS:
                continue
            warmup = ["--warmup-tokens", str(min(WARMUP_TOKENS, tokens // 2))]
            result = harness.run_child("benchmarks.trainer_step", args + ["--tokens", str(tokens)] + warmup,
                                       memory_cap=cap, timeout_s=timeout)
            row = {**result, "name": name, "tokens": tokens}
            if row["status"] == "ok":
                row["peak_mb"] = row["peak_over_start_bytes"] / 1e6
                row["model_peak_mb"] = row["peak_over_model_bytes"] / 1e6
            rows.append(row)
            print(f"  T={tokens} {name}: {row['status']} {row.get('error', '')}", flush=True)
    table = harness.format_table(rows, COLUMNS)
    print("\n" + table)

    def find(name, tokens):
        return next((r for r in rows if r["name"] == name and r["tokens"] == tokens and r["status"] == "ok"), None)

    verdicts = []
    for tokens in sizes:
        for name, baseline in JUDGED:
            crisp, trl = find(name, tokens), find(baseline, tokens)
            if not (crisp and trl):
                continue
            speed = trl["time_s"] / crisp["time_s"]
            for figure, key in MEMORY_FIGURES:
                memory = trl[key] / crisp[key]
                tag = ("PASS" if speed >= 3 and memory >= 8 else "MISS") if tokens in TARGET_TOKENS else "info"
                verdicts.append(f"{tag} T={tokens}: {name} {speed:.2f}x {baseline}'s throughput at 1/{memory:.1f} of "
                                f"its {figure} (target >= 3x at <= 1/8)")
        for name, baseline in LORA_PAIRS:
            lora, full = find(name, tokens), find(baseline, tokens)
            for figure, key in MEMORY_FIGURES if full and lora else ():
                ratio = lora[key] / full[key]
                verdicts.append(f"{'PASS' if ratio <= 0.5 else 'MISS'} T={tokens}: {name} {figure} = {ratio:.2f} x "
                                f"{baseline}'s (target <= 0.5)")
    print("\n".join(verdicts))
    facts = harness.machine_facts("cpu")
    record = {"benchmark": "trainer_step", "quick": bench_config.quick, "machine": facts, "rows": rows,
              "verdicts": verdicts}
    path = harness.append_json("trainer_step.json", record)
    os.makedirs(harness.RESULTS_DIR, exist_ok=True)
    markdown = ["| trainer | T | time s | step peak MB | peak over model MB | loss | status |",
                "|---|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        markdown.append(f"| {row['name']} | {row['tokens']} | {row.get('time_s', float('nan')):.1f} | "
                        f"{row.get('peak_mb', float('nan')):.0f} | {row.get('model_peak_mb', float('nan')):.0f} | "
                        f"{row.get('loss', float('nan')):.6g} | {row['status']} |")
    with open(os.path.join(harness.RESULTS_DIR, "trainer_step.md"), "w") as out:
        out.write(f"{harness.machine_line(facts)}\n\n" + "\n".join(markdown) + "\n\n" + "\n".join(verdicts) + "\n")
    plot(rows, os.path.join(harness.RESULTS_DIR, "trainer_step.png"), harness.machine_line(facts))
    print(f"rows appended to {path}; table in trainer_step.md, plot in trainer_step.png")

    for row in rows:
        assert row["status"] == "ok" or (row["name"].startswith("TRL") and row["status"] == "OOM"), row
    for tokens in sizes:
        for name, baseline in JUDGED:
            crisp, trl = find(name, tokens), find(baseline, tokens)
            if crisp and trl:  # same model, same rollouts, same teacher: the same loss
                assert abs(crisp["loss"] - trl["loss"]) <= 1e-4 * abs(trl["loss"]) + 1e-7, (name, crisp["loss"], trl["loss"])
        crisp, nopack = find("crisp-fast", tokens), find("crisp-fast nopack", tokens)
        if crisp and nopack:
            assert abs(crisp["loss"] - nopack["loss"]) <= 1e-5 * abs(nopack["loss"]) + 1e-8
