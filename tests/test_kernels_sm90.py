"""Compile-only check of every Triton kernel for Hopper (sm_90), no GPU needed: at the tiles the
launchers choose for D = 4096, V = 151,936, bf16, each kernel compiles, spills nothing and uses
HGMMA (wgmma), and the deterministic backward (deterministic=True) has no atomics at all. The
compile runs in a subprocess without TRITON_INTERPRET (tests/conftest.py sets
it for this process). The variants with every option on (bias, softcap, raw lse) and those for an
unaligned hidden size (D = 4095) are marked slow.

    PYTHONPATH=. python -m pytest -q tests/test_kernels_sm90.py            # ~1 min
    PYTHONPATH=. python -m pytest -q -m slow tests/test_kernels_sm90.py    # the option variants
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuobjdump_present() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))


pytestmark = pytest.mark.skipif(not _cuobjdump_present(), reason="the triton wheel has no cuobjdump to read SASS with")

EXPECTED_KERNELS = {"forward shared-W rkl", "forward separate-W rkl", "forward shared-W fkl",
                    "forward shared-W jsd sweep 1", "forward shared-W jsd sweep 2",
                    "backward shared-W rkl", "backward separate-W rkl", "backward shared-W jsd",
                    "backward deterministic dh rkl", "backward deterministic dW rkl"}


def _facts(variants: str, *extra: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    module = "crisp_fast.kernels.sm90_report"
    try:
        __import__(module)
    except ImportError:
        module = "kernels.sm90_report"  # an uninstalled checkout
    result = subprocess.run([sys.executable, "-m", module, "--json", "--variants", variants, *extra], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def plain_facts():
    return _facts("plain")


def _check(fact):
    assert fact["spill_bytes"] == 0, f"{fact['kernel']} spills {fact['spill_bytes']} bytes at {fact['config']}"
    assert fact["hgmma"] > 0, f"{fact['kernel']} lost HGMMA at {fact['config']}"
    assert 0 < fact["registers"] <= 255
    assert fact["shared_bytes"] <= 227 * 1024  # sm_90 opt-in maximum per block


def test_every_kernel_compiles_without_spills_and_with_hgmma(plain_facts):
    assert {fact["kernel"] for fact in plain_facts} == EXPECTED_KERNELS
    for fact in plain_facts:
        _check(fact)
    backward = [f for f in plain_facts if f["kernel"].startswith("backward")]
    atomic = [f for f in backward if "deterministic" not in f["kernel"]]
    owned = [f for f in backward if "deterministic" in f["kernel"]]
    assert len(owned) == 2 and len(atomic) == 3
    assert all(f["atomics"] > 0 for f in atomic), "the default backward scatters with fp32 atomics"
    assert all(f["atomics"] == 0 for f in owned), "deterministic=True must not use atomics"


@pytest.mark.slow
def test_option_variants_compile_without_spills_and_with_hgmma():
    facts = _facts("options")
    assert {fact["kernel"].replace(" +all options", "") for fact in facts} == EXPECTED_KERNELS
    for fact in facts:
        _check(fact)


@pytest.mark.slow
def test_unaligned_hidden_size_variants_compile_without_spills():
    """D = 4095: no 16-divisibility, scalar loads, the launchers' fallback tiles."""
    facts = _facts("all", "--unaligned")
    assert len(facts) == 2 * len(EXPECTED_KERNELS)
    for fact in facts:
        _check(fact)
