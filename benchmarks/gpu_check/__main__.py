"""python -m benchmarks.gpu_check [--dry-run] [--out DIR] [--only PART,...] [--plan]

Prints the plan (each part and its time budget), runs the parts one after another, each in its
own child process under its hard limit, then writes gpu_check.json, gpu_check.md and
gpu_check.log (every part's output) to --out (default $GPU_CHECK_OUT, else benchmarks/results/)
and prints the tables. Exit status 1 when a part failed, errored or timed out (a skip is fine).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from benchmarks.gpu_check import plan as plan_module
from benchmarks.gpu_check import report
from benchmarks.gpu_check.runner import run_plan
from benchmarks.harness import REPO_ROOT


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton in its interpreter")
    parser.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT") or os.path.join(REPO_ROOT, "benchmarks", "results"),
                        help="folder for gpu_check.json / .md / .log (default $GPU_CHECK_OUT, else benchmarks/results)")
    parser.add_argument("--only", default="", help="comma-separated part names (or prefixes, e.g. fused:) to run")
    parser.add_argument("--plan", action="store_true", help="print the plan and exit")
    parser.add_argument("--total-budget-s", type=float, default=None,
                        help=f"the whole check's limit (default {plan_module.TOTAL_BUDGET_S:.0f} s on the GPU, "
                             f"{plan_module.DRY_RUN_TOTAL_BUDGET_S:.0f} s for the dry run)")
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="multiply every part's limit and the total (e.g. 4 on a busy shared machine)")
    parser.add_argument("--test-workers", type=int, default=8, help="pytest-xdist workers for the tests part")
    args = parser.parse_args(argv)

    total = args.total_budget_s or (plan_module.DRY_RUN_TOTAL_BUDGET_S if args.dry_run else plan_module.TOTAL_BUDGET_S)
    parts = plan_module.build_plan(args.dry_run, test_workers=args.test_workers)
    if args.budget_scale <= 0:
        parser.error("--budget-scale must be > 0")
    total *= args.budget_scale
    for part in parts:
        part.budget_s *= args.budget_scale
    if args.only:
        wanted = [item for item in args.only.split(",") if item]
        parts = [part for part in parts if any(part.name == item or part.name.startswith(item) for item in wanted)]
        if not parts:
            parser.error(f"--only {args.only!r} matches no part; parts: "
                         + ", ".join(p.name for p in plan_module.build_plan(args.dry_run)))
    print(plan_module.format_plan(parts, total, args.dry_run), flush=True)
    if args.plan:
        return 0

    started = time.monotonic()
    facts = report.machine_facts(REPO_ROOT)  # first: the GPU and versions are in the output even if a part hangs
    print(f"[gpu-check] {facts.get('gpu', 'no CUDA device')}, torch {facts['packages']['torch']} "
          f"(CUDA {facts.get('torch_cuda')}), triton {facts['packages']['triton']}", flush=True)

    def progress(result):
        rows = f", {len(result.rows)} rows" if result.rows else ""
        why = f": {result.reason}" if result.reason else ""
        print(f"[gpu-check] {result.name}: {result.status} in {result.seconds:.1f} s "
              f"(limit {result.limit_s:.0f} s, {result.cpu_s or 0:.1f} CPU s){rows}{why}", flush=True)

    results = run_plan(parts, total_budget_s=total, cwd=REPO_ROOT, on_done=progress)
    records = [result.as_dict() for result in results]
    plan_record = [{"name": p.name, "budget_s": p.budget_s, "what": p.what, "argv": p.argv[1:]} for p in parts]
    json_path, md_path = report.write_report(args.out, records, facts, dry_run=args.dry_run, plan=plan_record)
    log_path = os.path.join(args.out, "gpu_check.log")
    with open(log_path, "w") as log:
        for result in results:
            log.write(f"===== {result.name}: {result.status} ({result.seconds:.1f} s) =====\n{result.log}\n")
    print("\n" + report.text_report(records, facts))
    print(f"\n[gpu-check] {time.monotonic() - started:.0f} s in all; wrote {json_path}, {md_path}, {log_path}")
    bad = [result.name for result in results if result.status in ("failed", "error", "timeout")]
    if bad:
        print(f"[gpu-check] not ok: {', '.join(bad)}")
    passed = sum(result.status == "ok" for result in results)
    skipped = sum(result.status == "skipped" for result in results)
    print(f"gpu-check: {passed} passed, {len(bad)} failed, {skipped} skipped")  # parts, as a test runner counts
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
