"""Speed and memory of the fused reverse KL against its baselines, one run, side by side.

    pytest -q -s benchmarks/test_fused_loss.py --quick      # ~2 min on 2 cores
    pytest -q -s benchmarks/test_fused_loss.py              # the full sweep (hours on 2 cores)

For every input dtype (`--bench-dtypes fp32,bf16`, default both) and shape (N tokens, hidden D,
V = 151,936) each implementation (every crisp_fast backend
usable here, a naive full-logits PyTorch version, Liger's chunked JSD at beta = 1, Liger's Triton
JSD on CUDA, TRL 1.16's chunked divergence) runs forward + backward in its own process; the
table reports the median time as a ratio to the 4-GEMM floor in the same dtype (student logits,
teacher logits, dh = gW, dW = g^T h, timed with torch.matmul in the same run; bf16 rows also
against the fp32 floor) and the peak memory over the
inputs as a ratio to the irreducible dW + dh. Rows go to benchmarks/results/fused_loss.json
with the machine's facts, a plot to benchmarks/results/fused_loss_<device>.png. The targets
print PASS/MISS and are not asserted (timings are the machine's, not the code's); the test does
assert that every implementation computes the same loss and gradients.
"""
from __future__ import annotations

import math
import os

from benchmarks import harness
from benchmarks.fused_impls import FLOOR, NAIVE, implementation_names

# targets from the issues (#8, #16), CPU, V = 151,936: time as a ratio to the floor in the same dtype
TIME_TARGETS = {("crisp:native", "float32"): 1.3, ("crisp:native", "bfloat16"): 1.3, ("crisp:torch", "float32"): 1.6}
TIME_TARGET_TOKENS = (2048, 16384)  # issue 16: "N = 2k to 16k"; smaller N are reported, not judged
MEMORY_TARGET = 1.5
# fp32 sums over 151,936 terms in different orders agree to far better than 1e-3 relative;
# bf16 inputs round the logits differently in every implementation (fp32 vs bf16 GEMM outputs)
AGREEMENT_RTOL = {"float32": 1e-3, "bfloat16": 3e-2}
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16"}

COLUMNS = [("implementation", "impl", ""), ("dtype", "dtype_short", ""), ("N", "tokens", "{}"), ("D", "hidden", "{}"),
           ("time s", "time_s", "{:.3f}"), ("x floor", "time_vs_floor", "{:.2f}"),
           ("x fp32 floor", "time_vs_fp32_floor", "{:.2f}"), ("GFLOP/s", "gflops", "{:.0f}"),
           ("floor schedule", "floor_schedule", ""),
           ("peak MB", "peak_mb", "{:.0f}"), ("x irreducible", "peak_vs_irreducible", "{:.2f}"),
           ("status", "status", "")]


def irreducible_bytes(tokens, hidden, vocab, dtype="float32"):
    """dW [V, D] + dh [N, D] in the inputs' dtype: the gradients any implementation hands back."""
    return (vocab * hidden + tokens * hidden) * (2 if dtype == "bfloat16" else 4)


def _selected(names, impl_filter):
    if not impl_filter:
        return names
    return [name for name in names if name == FLOOR or any(part in name for part in impl_filter)]


def _is_baseline(name):
    return name != FLOOR and not name.startswith("crisp:")


def run_sweep(config):
    """Every (dtype, D, N, implementation) point; an implementation that ran out of memory at
    some N is not run at larger N of the same dtype and D (reported as OOM, skipped)."""
    names, skipped = implementation_names(config.device)
    names = _selected(names, config.impl_filter)
    cap = harness.default_memory_cap(config.mem_cap_gib) if config.device == "cpu" else None
    rows = []
    for dtype in config.dtypes:
        for hidden in config.hidden:
            out_of_memory_at = {}
            for tokens in config.tokens:
                floor_time = None
                for name in names:
                    if _is_baseline(name) and config.baselines_max_tokens and tokens > config.baselines_max_tokens:
                        continue
                    row = _measure(config, name, dtype, hidden, tokens, cap, out_of_memory_at)
                    if row["status"] == "ok":
                        if name == FLOOR:
                            floor_time = row["time_s"]
                        if floor_time:
                            row["time_vs_floor"] = row["time_s"] / floor_time
                    rows.append(row)
                    _print_progress(row)
    _add_fp32_floor_ratios(rows)
    return rows, skipped, cap


def _measure(config, name, dtype, hidden, tokens, cap, out_of_memory_at):
    row = {"impl": name, "tokens": tokens, "hidden": hidden, "vocab": config.vocab, "dtype": dtype,
           "dtype_short": SHORT_DTYPE[dtype], "irreducible_bytes": irreducible_bytes(tokens, hidden, config.vocab, dtype)}
    if name in out_of_memory_at:
        row.update(status="OOM", error=f"skipped: OOM already at N={out_of_memory_at[name]}")
    else:
        args = ["--impl", name, "--tokens", str(tokens), "--hidden", str(hidden), "--vocab", str(config.vocab),
                "--device", config.device, "--dtype", dtype, "--reps", str(config.reps), "--warmup", str(config.warmup)]
        result = harness.run_child("benchmarks.fused_impls", args, memory_cap=cap, timeout_s=config.child_timeout_s)
        row.update({key: value for key, value in result.items() if key not in ("impl", "dtype")})
    if row["status"] == "OOM":
        out_of_memory_at.setdefault(name, tokens)
    if row["status"] == "ok":
        row["peak_mb"] = row["peak_bytes"] / 1e6
        row["peak_vs_irreducible"] = row["peak_bytes"] / row["irreducible_bytes"]
    return row


def _add_fp32_floor_ratios(rows):
    """bf16 rows also as a ratio to the fp32 floor at the same shape: what bf16 buys over fp32."""
    fp32_floor = {(row["hidden"], row["tokens"]): row["time_s"] for row in rows
                  if row["impl"] == FLOOR and row["dtype"] == "float32" and row["status"] == "ok"}
    for row in rows:
        reference = fp32_floor.get((row["hidden"], row["tokens"]))
        if row["status"] == "ok" and row["dtype"] != "float32" and reference:
            row["time_vs_fp32_floor"] = row["time_s"] / reference


def _print_progress(row):
    where = f"{row['impl']:<14} {row['dtype_short']} N={row['tokens']:<6} D={row['hidden']:<5}"
    if row["status"] == "ok":
        print(f"  {where} {row['time_s']:8.3f} s {row['peak_mb']:9.0f} MB", flush=True)
    else:
        print(f"  {where} {row['status']}: {row.get('error', '')}", flush=True)


def _judged(rows):
    """The rows a time target is judged on: N within TIME_TARGET_TOKENS, or every N when the run
    measured none there (a --quick run), with a word saying which."""
    low, high = TIME_TARGET_TOKENS
    inside = [row for row in rows if low <= row["tokens"] <= high]
    return (inside, f"N = {low}-{high}") if inside else (rows, "every N measured (none in the target range)")


def check_targets(rows, device):
    """PASS/MISS lines for the issues' targets (CPU only: they are stated for CPU)."""
    if device != "cpu":
        return ["targets are stated for CPU; none checked on " + device]
    lines = []
    for (name, dtype), time_target in TIME_TARGETS.items():
        ours = [row for row in rows if row["impl"] == name and row["dtype"] == dtype and row["vocab"] == 151936]
        label = f"{name} {SHORT_DTYPE[dtype]}"
        if not ours:
            lines.append(f"-    {label}: not measured here (backend unavailable, dtype or implementation filtered out, or V != 151,936)")
            continue
        failed = [row for row in ours if row["status"] != "ok"]
        judged, where = _judged(ours)
        worst_time = max((row["time_vs_floor"] for row in judged if row.get("time_vs_floor") is not None),
                         default=math.inf)
        verdict = "PASS" if not failed and worst_time <= time_target else "MISS"
        lines.append(f"{verdict} {label}: time <= {time_target}x the {SHORT_DTYPE[dtype]} 4-GEMM floor at {where} "
                     f"(worst {worst_time:.2f}x{', failures: ' + str(len(failed)) if failed else ''})")
    for name in sorted({row["impl"] for row in rows if row["impl"].startswith("crisp:")}):
        for dtype in sorted({row["dtype"] for row in rows}):
            ours = [row for row in rows if row["impl"] == name and row["dtype"] == dtype and row["status"] == "ok"]
            if not ours:
                continue
            worst = max(row["peak_vs_irreducible"] for row in ours)
            verdict = "PASS" if worst <= MEMORY_TARGET else "MISS"
            lines.append(f"{verdict} {name} {SHORT_DTYPE[dtype]}: peak memory over inputs <= {MEMORY_TARGET}x "
                         f"dW + dh (in {SHORT_DTYPE[dtype]}) at every N (worst {worst:.2f}x)")
    lines += _torch_bf16_vs_fp32(rows)
    return lines


def _torch_bf16_vs_fp32(rows):
    """Issue 16.2: the torch backend in bf16 no slower than in fp32, shape by shape."""
    times = {(row["dtype"], row["hidden"], row["tokens"]): row["time_s"] for row in rows
             if row["impl"] == "crisp:torch" and row["status"] == "ok"}
    ratios = [times[("bfloat16", d, n)] / times[("float32", d, n)] for (dtype, d, n) in times
              if dtype == "bfloat16" and ("float32", d, n) in times]
    if not ratios:
        return []
    verdict = "PASS" if max(ratios) <= 1.0 else "MISS"
    return [f"{verdict} crisp:torch: bf16 time <= fp32 time at every shape (worst bf16/fp32 {max(ratios):.2f}x)"]


def disagreements(rows):
    """Loss and gradient norms of every implementation against the naive one (or, where the
    naive one did not fit, the first crisp_fast backend) at the same shape."""
    problems = []
    keys = ("loss", "grad_hidden_norm", "grad_weight_norm")
    for shape in sorted({(row["dtype"], row["hidden"], row["tokens"]) for row in rows}):
        dtype = shape[0]
        measured = [row for row in rows if (row["dtype"], row["hidden"], row["tokens"]) == shape
                    and row["status"] == "ok" and row["impl"] != FLOOR]
        reference = next((row for row in measured if row["impl"] == NAIVE),
                         next((row for row in measured if row["impl"].startswith("crisp:")), None))
        for row in measured:
            for key in keys:
                expected, got = reference[key], row[key]
                if not math.isfinite(got) or abs(got - expected) > AGREEMENT_RTOL[dtype] * abs(expected) + 1e-6:
                    problems.append(f"{SHORT_DTYPE[dtype]} D={shape[1]} N={shape[2]} {row['impl']}: {key} {got:.6g} vs "
                                    f"{reference['impl']} {expected:.6g}")
    return problems


def test_fused_reverse_kl_speed_and_memory(bench_config):
    config = bench_config
    print(f"\nfused reverse KL, forward + backward, V = {config.vocab}, {'+'.join(config.dtypes)} on {config.device}, "
          f"N = {config.tokens}, D = {config.hidden}, {config.reps} timed reps (median) after {config.warmup} warm-up")
    rows, skipped, cap = run_sweep(config)
    facts = harness.machine_facts(config.device)
    facts["memory_cap_gib"] = None if cap is None else round(cap / harness.GIB, 2)
    print("\n" + harness.format_table(rows, COLUMNS))
    for name, why in skipped.items():
        print(f"not run: {name}: {why}")
    print("x floor: against the 4-GEMM floor in the same dtype (bf16: plain bf16 torch.mm with bf16 outputs, or "
          "fp32 GEMMs on upcast inputs where that probed faster: see 'floor schedule'); x fp32 floor: bf16 rows "
          "against the fp32 floor at the same shape")
    print(f"irreducible memory = dW + dh = (V*D + N*D) elements of the input dtype; peak = "
          f"{'max_memory_allocated' if config.device == 'cuda' else 'peak RSS'} minus the inputs"
          + (f"; CPU children killed above {cap / harness.GIB:.1f} GiB RSS (OOM)" if cap else ""))
    target_lines = check_targets(rows, config.device)
    print("\n".join(target_lines))
    problems = disagreements(rows)
    record = {"benchmark": "fused_reverse_kl", "quick": config.quick, "machine": facts, "skipped": skipped,
              "targets": target_lines, "disagreements": problems, "rows": rows}
    path = harness.append_json("fused_loss.json", record)
    plot = harness.plot_sweep(rows, os.path.join(harness.RESULTS_DIR, f"fused_loss_{config.device}.png"),
                              f"fused reverse KL fwd+bwd, V={config.vocab}",
                              subtitle=harness.machine_line(facts))
    print(f"rows appended to {path}" + (f"; plot {plot}" if plot else ""))

    errors = [f"{row['impl']} N={row['tokens']} D={row['hidden']}: {row['status']} {row.get('error', '')}"
              for row in rows if row["status"] not in ("ok", "OOM")]
    assert not errors, "implementations failed:\n" + "\n".join(errors)
    assert not problems, "implementations disagree:\n" + "\n".join(problems)
    assert any(row["status"] == "ok" and row["impl"].startswith("crisp:") for row in rows) or not any(
        row["impl"].startswith("crisp:") for row in rows), "no crisp_fast backend produced a result"
