"""The native C++ CPU backend (`csrc/`, built into `crisp_fast._native`): the backend protocol of
`crisp_fast.backends`, for CPU tensors in float32, bfloat16 or float16.

GEMMs go through the platform BLAS (ATen's `mm` on chunks); the whole epilogue (both online
log-sum-exps, the divergence, the entropy, the gradient tile) runs fused over each logits block in
OpenMP-parallel, vectorised C++. `forward_backward` computes statistics and gradients in one sweep
with exactly 4 GEMMs (no logits recomputed); `forward`/`backward` (reduction="none") stream over
vocabulary blocks. See csrc/fused_divergence.cpp for the tiling and the memory budget.

The extension is compiled by `pip install --no-build-isolation -e .` (or
`python setup.py build_ext --inplace`). When it is missing, `is_available()` says so and why; with
`CRISP_FAST_NATIVE_JIT=1` set, a source checkout compiles `csrc/` on first use instead
(torch.utils.cpp_extension.load, cached under torch's extension directory).
"""
from __future__ import annotations

import importlib
import os

import torch

try:
    from crisp_fast.kernels import stats_layout as _layout
except ImportError:  # an uninstalled checkout: kernels/ is a top-level folder
    from kernels import stats_layout as _layout

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")

_module = None
_why_not = None


def _jit_build():
    """Compile csrc/ with torch's JIT extension loader (source checkouts only; opt-in)."""
    from torch.utils.cpp_extension import load

    sources = sorted(os.path.join(_CSRC, name) for name in os.listdir(_CSRC) if name.endswith(".cpp"))
    if not sources:
        raise ImportError(f"no C++ sources in {_CSRC}")
    return load(name="crisp_fast_native_jit", sources=sources, extra_include_paths=[_CSRC],
                extra_cflags=["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-march=native"],
                extra_ldflags=["-fopenmp"], verbose=False)


def _python_layout() -> dict:
    """{column name: index} of kernels/stats_layout.py, the one definition of the stats layout."""
    return {name: value for name, value in vars(_layout).items() if name.isupper() and isinstance(value, int)}


def _layout_mismatch(module) -> str | None:
    """Why the compiled module's stats layout differs from the Python one (None when equal)."""
    compiled = dict(module.stats_layout()) if hasattr(module, "stats_layout") else {}
    expected = _python_layout()
    if compiled == expected:
        return None
    differing = sorted(name for name in set(compiled) | set(expected) if compiled.get(name) != expected.get(name))
    return (f"the compiled crisp_fast._native ({getattr(module, '__file__', '?')}) has another stats layout than "
            f"kernels/stats_layout.py (columns {differing}: compiled {[compiled.get(n) for n in differing]}, "
            f"expected {[expected.get(n) for n in differing]}); rebuild it with "
            "`pip install --no-build-isolation -e .`")


def _load():
    global _module, _why_not
    if _module is not None or _why_not is not None:
        return _module
    try:
        _module = importlib.import_module("crisp_fast._native")
    except ImportError as error:
        _why_not = (f"the C++ extension crisp_fast._native is not built ({error}); build it with "
                    "`pip install --no-build-isolation -e .` (needs torch and a C++ compiler at build time), "
                    "or set CRISP_FAST_NATIVE_JIT=1 to compile csrc/ on first use")
        if os.environ.get("CRISP_FAST_NATIVE_JIT") == "1" and os.path.isdir(_CSRC):
            try:
                _module, _why_not = _jit_build(), None
            except Exception as jit_error:  # noqa: BLE001 - any compiler failure is the reason
                _why_not = f"{_why_not}; the JIT build failed too: {jit_error}"
    if _module is not None:
        mismatch = _layout_mismatch(_module)
        if mismatch:  # a stale build would write columns the Python side reads as something else
            _module, _why_not = None, mismatch
    return _module


def is_available() -> tuple[bool, str]:
    """(True, "") when the compiled extension loads, else (False, the reason)."""
    return (True, "") if _load() is not None else (False, _why_not)


def build_info() -> dict:
    """What the extension was compiled with: compiler, flags, -march level, BLAS, threads and the
    GEMM path bf16/fp16 inputs take here (`crisp-fast backends` prints it)."""
    return dict(_native().build_info())


def plan(n: int, vocab: int, d: int, d_t: int | None = None, *, dtype=torch.float32, full_rows: bool | None = None,
         workspace_bytes: int | None = None) -> dict:
    """How the backend tiles a problem: chunk_rows, vocab_block, full_rows, workspace_bytes (the
    C++ scratch beyond the outputs). full_rows=None is forward_backward's choice: full rows (4
    GEMMs) when the budget holds enough of them for efficient GEMMs, else streaming (6 GEMMs on
    larger chunks); True / False force one. `workspace_bytes`: the budget (None: the default)."""
    if workspace_bytes is not None and workspace_bytes < 0:
        raise ValueError(f"workspace_bytes must be None or >= 0, got {workspace_bytes}")
    d_t = d if d_t is None else d_t
    budget = -1 if workspace_bytes is None else int(workspace_bytes)
    low_precision = dtype != torch.float32
    if full_rows is None:
        full_rows = _native().fused_uses_full_rows(n, vocab, d, d_t, low_precision, budget)
    return _native().plan(n, vocab, d, d_t, low_precision, full_rows, budget)


def _native():
    module = _load()
    if module is None:
        raise RuntimeError(f"backend='native' is not available here: {_why_not}")
    return module


def _check(student_hidden, teacher_hidden, weight, teacher_weight):
    for name, tensor in (("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden),
                         ("weight", weight), ("teacher_weight", teacher_weight)):
        if tensor is None:
            continue
        if tensor.device.type != "cpu":
            raise ValueError(f"backend='native' runs on CPU tensors; {name} is on {tensor.device}")
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"backend='native' takes float32, bfloat16 or float16; {name} is {tensor.dtype}")


def _options(divergence, beta, temperature, student_scale, teacher_scale, student_softcap, teacher_softcap,
             need_raw_lse, deterministic, workspace_bytes):
    return (divergence, float(beta), float(temperature), float(student_scale), float(teacher_scale),
            None if student_softcap is None else float(student_softcap),
            None if teacher_softcap is None else float(teacher_softcap), bool(need_raw_lse), bool(deterministic),
            -1 if workspace_bytes is None else int(workspace_bytes))


def forward(student_hidden, teacher_hidden, weight, teacher_weight, student_bias, teacher_bias, *,
            divergence="reverse_kl", beta=1.0, temperature=1.0, student_scale=1.0, teacher_scale=1.0,
            student_softcap=None, teacher_softcap=None, need_raw_lse=False, deterministic=False, workspace_bytes=None):
    """fp32 stats [N, NUM_STATS] (columns in kernels/stats_layout.py). `deterministic` is accepted for
    the protocol: this backend is bitwise repeatable run to run whatever its value."""
    _check(student_hidden, teacher_hidden, weight, teacher_weight)
    return _native().forward(student_hidden, teacher_hidden, weight, teacher_weight, student_bias, teacher_bias,
                             *_options(divergence, beta, temperature, student_scale, teacher_scale,
                                       student_softcap, teacher_softcap, need_raw_lse, deterministic, workspace_bytes))


def backward(student_hidden, teacher_hidden, weight, teacher_weight, student_bias, teacher_bias, stats, grad_loss,
             grad_raw_lse, *, need_grad_hidden, need_grad_weight, need_grad_bias, divergence="reverse_kl", beta=1.0,
             temperature=1.0, student_scale=1.0, teacher_scale=1.0, student_softcap=None, teacher_softcap=None,
             need_raw_lse=False, deterministic=False, workspace_bytes=None):
    """(grad_hidden fp32 [N, D] | None, grad_weight fp32 [V, D] | None, grad_bias fp32 [V] | None),
    recomputing the logits block by block from the saved statistics."""
    _check(student_hidden, teacher_hidden, weight, teacher_weight)
    return _native().backward(student_hidden, teacher_hidden, weight, teacher_weight, student_bias, teacher_bias,
                              stats, grad_loss, grad_raw_lse, bool(need_grad_hidden), bool(need_grad_weight),
                              bool(need_grad_bias and student_bias is not None),
                              *_options(divergence, beta, temperature, student_scale, teacher_scale,
                                        student_softcap, teacher_softcap, need_raw_lse, deterministic, workspace_bytes))


def forward_backward(student_hidden, teacher_hidden, weight, teacher_weight, student_bias, teacher_bias, grad_loss,
                     grad_raw_lse, *, need_grad_hidden, need_grad_weight, need_grad_bias, divergence="reverse_kl",
                     beta=1.0, temperature=1.0, student_scale=1.0, teacher_scale=1.0, student_softcap=None,
                     teacher_softcap=None, need_raw_lse=False, deterministic=False, workspace_bytes=None):
    """(stats, (grad_hidden, grad_weight, grad_bias)) from one sweep: 4 GEMMs, no logits recomputed."""
    _check(student_hidden, teacher_hidden, weight, teacher_weight)
    stats, grads = _native().forward_backward(
        student_hidden, teacher_hidden, weight, teacher_weight, student_bias, teacher_bias, grad_loss, grad_raw_lse,
        bool(need_grad_hidden), bool(need_grad_weight), bool(need_grad_bias and student_bias is not None),
        *_options(divergence, beta, temperature, student_scale, teacher_scale, student_softcap, teacher_softcap,
                  need_raw_lse, deterministic, workspace_bytes))
    return stats, tuple(grads)
