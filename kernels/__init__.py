"""Triton kernels for the fused linear divergence (installed as `crisp_fast.kernels`).

Only @triton.jit functions and their launchers live here: no autograd, no modules, and no
import of anything else in crisp_fast. The launchers follow the backend protocol described in
`crisp_fast.backends` (forward -> per-token statistics, backward -> fp32 gradients). The
statistics' columns are defined once, in `stats_layout` (plain ints, imported by the kernels and
re-exported by crisp_fast.backends).
"""
