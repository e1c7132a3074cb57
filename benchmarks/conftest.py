"""Options of `pytest benchmarks/` and the configuration fixture the benchmarks share.

    pytest -q -s benchmarks --quick                  # CI smoke run: a couple of minutes on 2 cores
    pytest -q -s benchmarks                          # the full sweep (hours on 2 CPU cores)
    pytest -q -s benchmarks/test_fused_loss.py --bench-hidden 256 --bench-tokens 1024,2048

`-s` shows the tables as they are printed; they are also saved under benchmarks/results/.
"""
from __future__ import annotations

import dataclasses
import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_addoption(parser):
    group = parser.getgroup("crisp-fast benchmarks")
    group.addoption("--quick", action="store_true", help="small shapes and few repetitions (CI smoke run)")
    group.addoption("--bench-device", choices=("cpu", "cuda"), default=None,
                    help="device to benchmark (default: cuda when available, else cpu)")
    group.addoption("--bench-tokens", default=None, help="comma-separated token counts N to sweep")
    group.addoption("--bench-hidden", default=None, help="comma-separated hidden sizes D to sweep")
    group.addoption("--bench-vocab", type=int, default=151936, help="vocabulary size V (default Qwen3's 151,936)")
    group.addoption("--bench-dtypes", default="fp32,bf16",
                    help="comma-separated input dtypes to sweep, fp32 and/or bf16 (default both); each "
                         "dtype's times are reported against the 4-GEMM floor in the same dtype")
    group.addoption("--bench-reps", type=int, default=None, help="timed repetitions per point (median reported)")
    group.addoption("--bench-impls", default=None,
                    help="comma-separated substrings: only implementations whose name contains one of them")
    group.addoption("--bench-baselines-max-tokens", type=int, default=None,
                    help="run the baselines (naive, Liger, TRL) only up to this N; crisp_fast and the floor run every N")
    group.addoption("--bench-mem-cap-gib", type=float, default=None,
                    help="kill a CPU child above this RSS and report OOM (default: free memory - 1.5 GiB)")


@dataclasses.dataclass
class BenchConfig:
    quick: bool
    device: str
    tokens: list[int]
    hidden: list[int]
    vocab: int
    dtypes: list[str]  # torch names: "float32", "bfloat16"
    reps: int
    warmup: int
    impl_filter: list[str] | None
    baselines_max_tokens: int | None
    mem_cap_gib: float | None
    child_timeout_s: float


DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}


def _dtypes(text):
    names = [item.strip().lower() for item in text.split(",") if item.strip()]
    unknown = [name for name in names if name not in DTYPE_NAMES]
    if unknown or not names:
        raise pytest.UsageError(f"--bench-dtypes {text!r}: expected a comma-separated list of fp32, bf16")
    return list(dict.fromkeys(DTYPE_NAMES[name] for name in names))


def _ints(text):
    return [int(item) for item in text.split(",") if item.strip()]


@pytest.fixture(scope="session")
def bench_config(request) -> BenchConfig:
    import torch

    option = request.config.getoption
    device = option("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.fail("--bench-device cuda but torch sees no CUDA device")
    quick = option("--quick")
    if quick:
        tokens, hidden, reps = [128, 256], [256], 2
    elif device == "cuda":
        tokens, hidden, reps = [1024, 2048, 4096, 8192, 16384, 32768], [256, 1024, 4096], 5
    else:
        tokens, hidden, reps = [512, 1024, 2048, 4096, 8192, 16384], [256, 1024], 3
    return BenchConfig(
        quick=quick, device=device,
        tokens=_ints(option("--bench-tokens")) if option("--bench-tokens") else tokens,
        hidden=_ints(option("--bench-hidden")) if option("--bench-hidden") else hidden,
        vocab=option("--bench-vocab"),
        dtypes=_dtypes(option("--bench-dtypes")), reps=option("--bench-reps") or reps, warmup=1,
        impl_filter=option("--bench-impls").split(",") if option("--bench-impls") else None,
        baselines_max_tokens=option("--bench-baselines-max-tokens"),
        mem_cap_gib=option("--bench-mem-cap-gib"),
        child_timeout_s=600.0 if quick else 4 * 3600.0,
    )


@pytest.fixture
def seed(request):
    """A fresh seed per run, printed so a run can be replayed with CRISP_FAST_SEED=<seed>
    (the same contract as tests/conftest.py's fixture)."""
    import random

    value = int(os.environ.get("CRISP_FAST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"[{request.node.name}] seed = {value}")
    return value
