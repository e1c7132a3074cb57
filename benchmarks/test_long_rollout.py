"""The long-rollout case: one CRISP step on a 16,384-token response fits with crisp_fast's fused
loss, while the same step with materialised logits does not (or needs far more memory).

    pytest -q -s benchmarks/test_long_rollout.py            # 16,384 response tokens
    pytest -q -s benchmarks/test_long_rollout.py --quick    # 512 tokens (a smoke run)

Each variant runs in its own process (`benchmarks/rollout_step.py`: a 2-layer, hidden-256
Qwen3 with the real 151,936 vocabulary; teacher pass without grad, student pass with grad, mean
reverse KL over the response, backward, AdamW), under the same RSS watchdog as the loss sweep:
above the cap (default: the memory free now minus 1.5 GiB; on a quiet 24 GiB machine ~21 GiB)
the child is killed and reported as OOM. Rows go to benchmarks/results/long_rollout.json.
"""
from __future__ import annotations

from benchmarks import harness

QUICK_TOKENS, FULL_TOKENS = 512, 16384

COLUMNS = [("step", "loss_kind", ""), ("backend", "backend", ""), ("response tokens", "response_tokens", "{}"),
           ("time s", "time_s", "{:.1f}"), ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
           ("over model+inputs MB", "peak_over_start_mb", "{:.0f}"), ("status", "status", "")]


def test_long_rollout_step_fits_only_fused(bench_config):
    tokens = QUICK_TOKENS if bench_config.quick else FULL_TOKENS
    cap = harness.default_memory_cap(bench_config.mem_cap_gib)
    timeout = 1200.0 if bench_config.quick else 3 * 3600.0
    print(f"\none CRISP step (teacher pass, student pass, reverse KL, backward, AdamW), tiny Qwen3 with "
          f"V = 151,936, {tokens} response tokens, children killed above {cap / harness.GIB:.1f} GiB RSS")
    rows = []
    for loss_kind in ("fused", "materialised"):
        result = harness.run_child("benchmarks.rollout_step",
                                   ["--loss", loss_kind, "--response-tokens", str(tokens)],
                                   memory_cap=cap, timeout_s=timeout)
        row = {"loss_kind": loss_kind, "response_tokens": tokens, **result}
        if row["status"] == "ok":
            row["peak_rss_mb"] = row["peak_rss_bytes"] / 1e6
            row["peak_over_start_mb"] = row["peak_over_start_bytes"] / 1e6
        rows.append(row)
        print(f"  {loss_kind}: {row['status']} {row.get('error', '')}", flush=True)
    print("\n" + harness.format_table(rows, COLUMNS))
    fused, materialised = rows
    fits = fused["status"] == "ok"
    only_fused = fits and materialised["status"] == "OOM"
    print(f"{'PASS' if fits else 'MISS'} the fused step completes within the {cap / harness.GIB:.1f} GiB cap")
    if bench_config.quick:
        print(f"(quick: at {tokens} tokens both steps are expected to fit; the claim is for {FULL_TOKENS})")
    else:
        print(f"{'PASS' if only_fused else 'MISS'} the materialised step does not fit "
              f"({materialised['status']}{': ' + materialised.get('error', '') if materialised['status'] != 'ok' else ''})")
    facts = harness.machine_facts("cpu")
    facts["memory_cap_gib"] = round(cap / harness.GIB, 2)
    path = harness.append_json("long_rollout.json", {"benchmark": "long_rollout_step", "quick": bench_config.quick,
                                                     "machine": facts, "rows": rows})
    print(f"rows appended to {path}")

    assert fits, f"the fused step failed: {fused}"
    assert materialised["status"] in ("ok", "OOM"), f"the materialised step failed: {materialised}"
    if materialised["status"] == "ok":
        # same model, same data: the two losses are the same number
        assert abs(fused["loss"] - materialised["loss"]) <= 1e-3 * abs(materialised["loss"]) + 1e-6
        assert fused["peak_over_start_bytes"] < materialised["peak_over_start_bytes"]


LONGEST_TOKENS, LONGEST_QUICK_TOKENS = 32768, 1024


def test_32k_token_response_trains_in_one_trainer_step(bench_config):
    """A single 32,768-token response (one prompt) through crisp-fast's Trainer in one step:
    packed, activation checkpointing on (what `auto` decides at this length), attention by SDPA's
    causal kernel per sequence (no T x T scores or mask), fused loss. Its own process, under the
    memory cap; the row (time, peak RSS over the step's start) goes to long_rollout.json."""
    tokens = LONGEST_QUICK_TOKENS if bench_config.quick else LONGEST_TOKENS
    cap = harness.default_memory_cap(bench_config.mem_cap_gib)
    result = harness.run_child("benchmarks.trainer_step",
                               ["--trainer", "crisp", "--tokens", str(tokens), "--prompts", "1",
                                "--checkpointing", "on"],
                               memory_cap=cap, timeout_s=1800.0 if bench_config.quick else 4 * 3600.0)
    row = {"loss_kind": "trainer step (packed, checkpointing)", "response_tokens": tokens, **result}
    if row["status"] == "ok":
        row["peak_over_start_mb"] = row["peak_over_start_bytes"] / 1e6
    print("\n" + harness.format_table([row], [c for c in COLUMNS if c[1] != "peak_rss_mb"]))
    harness.append_json("long_rollout.json", {"benchmark": "trainer_step_one_long_response", "quick": bench_config.quick,
                                              "machine": harness.machine_facts("cpu"), "rows": [row]})
    assert row["status"] == "ok", row
    assert row["activation_checkpointing"] is True
