"""Every Triton kernel compiled ahead of time for sm_90 with the triton on sys.path (no GPU), so a
version gap with the GPU image (triton 3.6) shows here, not there. `make sm90-triton36` installs
triton 3.6 into a throwaway --target folder that shadows the installed one and runs:

    python -m benchmarks.gpu_check.sm90_compat --expect-triton "3.6.*"

Prints registers, spill bytes, shared memory and HGMMA count per kernel (kernels/sm90_report.py),
appends the facts to benchmarks/results/sm90_compat.json, and fails if triton is not the expected
version, a kernel does not compile, spills, or has no HGMMA.
"""
from __future__ import annotations

import argparse
import fnmatch
import importlib
import sys

from benchmarks import harness


def _report_module():
    for name in ("crisp_fast.kernels.sm90_report", "kernels.sm90_report"):  # installed, then a checkout
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError("neither crisp_fast.kernels.sm90_report nor kernels.sm90_report is importable")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--expect-triton", default="*", help="a version pattern, e.g. '3.6.*'")
    parser.add_argument("--variants", choices=("plain", "options", "all"), default="all")
    args = parser.parse_args(argv)
    import triton

    print(f"triton {triton.__version__} from {triton.__file__}")
    if not fnmatch.fnmatch(triton.__version__, args.expect_triton):
        print(f"MISS triton {triton.__version__} is not {args.expect_triton}: the shadowing install did not take")
        return 1
    report = _report_module()
    which = {"plain": (False,), "options": (True,), "all": (False, True)}[args.variants]
    facts = report.sm90_facts("bf16", report.QWEN3_8B, heavy=which)
    print(f"sm_90, bf16, N={report.QWEN3_8B['n']} D={report.QWEN3_8B['d']} V={report.QWEN3_8B['v']}")
    print(report.format_table(facts))
    spilling = [fact["kernel"] for fact in facts if fact["spill_bytes"] > 0]
    without_hgmma = [fact["kernel"] for fact in facts if fact["hgmma"] == 0]
    print(f"{'MISS' if spilling else 'PASS'} zero spill bytes in all {len(facts)} kernels"
          + (f" (spills: {spilling})" if spilling else ""))
    print(f"{'MISS' if without_hgmma else 'PASS'} HGMMA in every kernel" + (f" (none in: {without_hgmma})" if without_hgmma else ""))
    path = harness.append_json("sm90_compat.json", {"benchmark": "sm90_compat", "triton": triton.__version__,
                                                    "variants": args.variants, "machine": harness.machine_facts("cpu"),
                                                    "kernels": facts})
    print(f"facts appended to {path}")
    return 1 if spilling or without_hgmma else 0


if __name__ == "__main__":
    sys.exit(main())
