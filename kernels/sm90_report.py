"""Compile every Triton kernel of the fused divergence ahead of time for Hopper (sm_90) and read the
machine code: registers, spills, shared memory and HGMMA (wgmma) instructions per kernel. No GPU
is needed: triton.compile targets sm_90 and the wheel's own ptxas/cuobjdump do the rest.

    python -m crisp_fast.kernels.sm90_report          # installed package
    python -m kernels.sm90_report                     # from the repository root

Kernels: the statistics kernel per divergence mode, the atomic backward, and the two launches of
the deterministic backward (dh owner, dW owner). The configurations are the ones the launchers
choose (forward_config / backward_config) for a Qwen3-8B-like problem: D = 4096, V = 151,936, bf16 inputs, 8,192 tokens. `sm90_facts()` returns
the facts as a list of dicts for the benchmarks. Must run without TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import torch

QWEN3_8B = dict(n=8192, d=4096, v=151_936)


def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found in the triton wheel at {path}")
    return path


def _kernels():
    try:
        from crisp_fast.kernels import divergence_backward as bwd, divergence_forward as fwd
    except ImportError:
        from kernels import divergence_backward as bwd, divergence_forward as fwd
    return fwd, bwd


def _signature(fn, pointer_types: dict, constexprs: dict) -> dict:
    """Triton signature: pointers as given, ints i32, floats fp32, constexprs marked."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_types.get(name, "*fp32")
        elif name in ("N", "V", "D", "DT", "tiles_per_split", "blocks_per_split"):
            signature[name] = "i32"
        else:
            signature[name] = "fp32"
    return signature


def _divisibility_attrs(fn, signature: dict, int_values: dict) -> dict:
    """What the JIT would specialise at launch: 16-byte-aligned tensors (torch allocations) and
    integer arguments divisible by 16 get `tt.divisibility = 16`. Without it the loads cannot be
    vectorised or pipelined (cp.async), and the report would describe a kernel that never runs."""
    attrs = {}
    for index, name in enumerate(fn.arg_names):
        kind = signature[name]
        if kind.startswith("*") or (kind == "i32" and int_values.get(name, 1) % 16 == 0):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return attrs


def kernel_variants(dtype: str = "bf16", shape: dict | None = None, *, heavy=(False, True)) -> list[dict]:
    """Every kernel the launchers use for `shape`, with the launcher-chosen tiles and warps; `heavy`
    selects the plain variants (False), the bias + softcap + raw-lse ones (True) or both."""
    fwd, bwd = _kernels()
    shape = shape or QWEN3_8B
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    inputs = {name: f"*{dtype}" for name in ("hs_ptr", "ht_ptr", "w_ptr", "wt_ptr")}
    variants = []
    ints = dict(N=shape["n"], V=shape["v"], D=shape["d"], DT=shape.get("dt", shape["d"]))
    for with_options in heavy:  # plain, then bias + softcaps + raw lse (+ bias grad) on both sides
        aligned = ints["D"] % 16 == ints["DT"] % 16 == 0
        f_cfg = fwd.forward_config(shape["n"], shape["d"], shape["v"], torch_dtype, heavy=with_options,
                                   aligned=aligned, interpret=False)
        b_cfg = bwd.backward_config(shape["n"], shape["d"], shape["v"], torch_dtype, heavy=with_options,
                                    aligned=aligned, interpret=False)
        common = dict(HAS_BS=with_options, HAS_BT=with_options, HAS_SCAP=with_options, HAS_TCAP=with_options,
                      UPCAST=False, PRECISION=fwd._precision(torch_dtype))
        tag = " +all options" if with_options else ""
        for label, mode, shared in (("forward shared-W rkl", fwd.REVERSE_KL, True),
                                    ("forward separate-W rkl", fwd.REVERSE_KL, False),
                                    ("forward shared-W fkl", fwd.FORWARD_KL, True),
                                    ("forward shared-W jsd sweep 1", fwd.JSD_FIRST, True),
                                    ("forward shared-W jsd sweep 2", fwd.JSD_SECOND, True)):
            constexprs = dict(common, MODE=mode, SHARED_W=shared, NEED_RAW=with_options and mode != fwd.JSD_SECOND,
                              BT=f_cfg["BT"], BV=f_cfg["BV"], BK=f_cfg["BK"])
            variants.append(dict(label=label + tag, fn=fwd.divergence_stats_kernel, constexprs=constexprs,
                                 pointers=inputs, num_warps=f_cfg["num_warps"], num_stages=f_cfg["num_stages"],
                                 splits=f_cfg["splits"], ints=dict(ints, tiles_per_split=f_cfg["tiles_per_split"])))
        for label, mode, shared in (("backward shared-W rkl", fwd.REVERSE_KL, True),
                                    ("backward separate-W rkl", fwd.REVERSE_KL, False),
                                    ("backward shared-W jsd", fwd.JSD_FIRST, True)):
            constexprs = dict(common, MODE=mode, SHARED_W=shared, NEED_RAW=with_options, NEED_DH=True, NEED_DW=True,
                              NEED_DB=with_options, BT=b_cfg["BT"], BV=b_cfg["BV"], BK=b_cfg["BK"])
            variants.append(dict(label=label + tag, fn=bwd.divergence_backward_kernel, constexprs=constexprs,
                                 pointers=inputs, num_warps=b_cfg["num_warps"], num_stages=b_cfg["num_stages"],
                                 splits=None, ints=ints))
        # deterministic=True: one owner per gradient tile, no atomics (divergence_backward_owned_kernel)
        token_blocks = -(-shape["n"] // b_cfg["BT"])
        vocab_tiles = -(-shape["v"] // b_cfg["BV"])
        for label, own_dh, owners, blocks in (("backward deterministic dh rkl", True, token_blocks, vocab_tiles),
                                              ("backward deterministic dW rkl", False, vocab_tiles, token_blocks)):
            split_count = bwd.deterministic_splits(owners, blocks, interpret=False)
            per_split = -(-blocks // split_count)
            constexprs = dict(common, MODE=fwd.REVERSE_KL, SHARED_W=True, NEED_RAW=with_options, OWN_DH=own_dh,
                              NEED_DB=with_options and not own_dh, BT=b_cfg["BT"], BV=b_cfg["BV"], BK=b_cfg["BK"])
            variants.append(dict(label=label + tag, fn=bwd.divergence_backward_owned_kernel, constexprs=constexprs,
                                 pointers=inputs, num_warps=b_cfg["num_warps"], num_stages=b_cfg["num_stages"],
                                 splits=-(-blocks // per_split), ints=dict(ints, blocks_per_split=per_split)))
    return variants


def _parse_resources(text: str) -> dict:
    found = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        match = re.search(rf"\b{key}:(\d+)", text)
        found[key] = int(match.group(1)) if match else 0
    return found


def compile_variant(variant: dict, workdir: str) -> dict:
    """Compile one variant for sm_90 and return its resource facts."""
    import triton
    from triton.backends.compiler import GPUTarget

    fn = variant["fn"]
    signature = _signature(fn, variant["pointers"], variant["constexprs"])
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=variant["constexprs"],
                                       attrs=_divisibility_attrs(fn, signature, variant["ints"]))
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=variant["num_warps"], num_stages=variant["num_stages"]))
    cubin_path = os.path.join(workdir, re.sub(r"\W+", "_", variant["label"]) + ".cubin")
    with open(cubin_path, "wb") as handle:
        handle.write(compiled.asm["cubin"])
    tool = _cuobjdump()
    usage = subprocess.run([tool, "-res-usage", cubin_path], capture_output=True, text=True, check=True).stdout
    sass = subprocess.run([tool, "-sass", cubin_path], capture_output=True, text=True, check=True).stdout
    resources = _parse_resources(usage)
    c = variant["constexprs"]
    return dict(kernel=variant["label"], function=fn.__name__, registers=resources["REG"],
                stack_bytes=resources["STACK"], local_bytes=resources["LOCAL"],
                spill_bytes=resources["STACK"] + resources["LOCAL"],
                shared_bytes=max(resources["SHARED"], compiled.metadata.shared),
                hgmma=len(re.findall(r"\bHGMMA\b", sass)),
                atomics=len(re.findall(r"\b(?:RED|REDG|ATOM|ATOMG)\b", sass)),
                config=f"BT={c['BT']} BV={c['BV']} BK={c['BK']} warps={variant['num_warps']} "
                       f"stages={variant['num_stages']}"
                       + (f" splits={variant['splits']}" if variant["splits"] else ""))


def sm90_facts(dtype: str = "bf16", shape: dict | None = None, *, heavy=(False, True)) -> list[dict]:
    """Resource facts of every kernel, compiled for sm_90 at the launchers' configurations."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("sm90_report compiles real kernels: run it without TRITON_INTERPRET=1")
    with tempfile.TemporaryDirectory() as workdir:
        return [compile_variant(variant, workdir) for variant in kernel_variants(dtype, shape, heavy=heavy)]


def format_table(facts: list[dict]) -> str:
    head = f"{'kernel':42s} {'regs':>5s} {'spill':>6s} {'smem':>7s} {'hgmma':>6s}  config"
    lines = [head, "-" * len(head)]
    for f in facts:
        lines.append(f"{f['kernel']:42s} {f['registers']:5d} {f['spill_bytes']:6d} {f['shared_bytes']:7d} "
                     f"{f['hgmma']:6d}  {f['config']}")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--variants", choices=("plain", "options", "all"), default="all")
    parser.add_argument("--unaligned", action="store_true",
                        help="N, D, V not divisible by 16 (8191, 4095, 151935): scalar loads, other tiles")
    parser.add_argument("--json", action="store_true", help="print the facts as JSON instead of a table")
    args = parser.parse_args()
    which = {"plain": (False,), "options": (True,), "all": (False, True)}[args.variants]
    shape = dict(n=8191, d=4095, v=151_935) if args.unaligned else QWEN3_8B
    facts = sm90_facts(args.dtype, shape, heavy=which)
    if args.json:
        print(json.dumps(facts))
    else:
        print(f"sm_90, {args.dtype}, N={shape['n']} D={shape['d']} V={shape['v']}")
        print(format_table(facts))
