"""GPU readiness without a GPU: every Triton kernel of the fused loss compiled ahead of time for
sm_90 (Hopper) at the tiles the launchers choose for Qwen3-8B-like shapes (D = 4,096,
V = 151,936, bf16), with registers, spill/stack bytes, shared memory and HGMMA count read from
the SASS by `kernels/sm90_report.py`.

    pytest -q -s benchmarks/test_gpu_readiness.py            # plain and all-options variants
    pytest -q -s benchmarks/test_gpu_readiness.py --quick    # plain variants only

The bar: zero spill bytes and HGMMA (wgmma) present in every kernel. These are facts of the
compiled code, not timings, so the test asserts them. The report runs in a child process without
TRITON_INTERPRET (which would replace the compiler by the interpreter); it needs the NVIDIA
backend of the triton wheel (ptxas, cuobjdump) and no GPU. Facts go to
benchmarks/results/gpu_readiness.json.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from benchmarks import harness

COLUMNS = [("kernel", "kernel", ""), ("registers", "registers", "{}"), ("spill B", "spill_bytes", "{}"),
           ("stack B", "stack_bytes", "{}"), ("smem B", "shared_bytes", "{}"), ("HGMMA", "hgmma", "{}"),
           ("config", "config", "")]


def _report_module() -> str:
    # installed: crisp_fast.kernels; from a checkout, the top-level kernels/ folder
    if importlib.util.find_spec("crisp_fast.kernels") is not None:
        return "crisp_fast.kernels.sm90_report"
    return "kernels.sm90_report"


def _nvidia_tools_present() -> bool:
    import triton

    binaries = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return all(os.path.exists(os.path.join(binaries, tool)) for tool in ("ptxas", "cuobjdump"))


def test_triton_kernels_compile_for_sm90_without_spills(bench_config):
    if not _nvidia_tools_present():
        pytest.skip("this triton wheel has no NVIDIA backend tools (ptxas, cuobjdump): cannot compile for sm_90")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = harness.REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    variants = "plain" if bench_config.quick else "all"
    command = [sys.executable, "-m", _report_module(), "--json", "--variants", variants]
    done = subprocess.run(command, cwd=harness.REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stderr[-3000:]}"
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts, "sm90_report returned no kernels"

    print(f"\nsm_90 ahead-of-time compile, bf16, Qwen3-8B-like shapes (D = 4096, V = 151,936), {variants} variants")
    print(harness.format_table(facts, COLUMNS))
    spilling = [fact["kernel"] for fact in facts if fact["spill_bytes"] > 0]
    without_hgmma = [fact["kernel"] for fact in facts if fact["hgmma"] == 0]
    print(f"{'MISS' if spilling else 'PASS'} zero spill bytes in every kernel" + (f" (spills: {spilling})" if spilling else ""))
    print(f"{'MISS' if without_hgmma else 'PASS'} HGMMA in every kernel"
          + (f" (none in: {without_hgmma})" if without_hgmma else ""))
    path = harness.append_json("gpu_readiness.json", {"benchmark": "sm90_readiness", "variants": variants,
                                                      "machine": harness.machine_facts("cpu"), "kernels": facts})
    print(f"facts appended to {path}")
    assert not spilling, f"kernels spill registers on sm_90: {spilling}"
    assert not without_hgmma, f"kernels without HGMMA on sm_90: {without_hgmma}"
