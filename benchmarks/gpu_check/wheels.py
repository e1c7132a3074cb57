"""`make gpu-wheels`: the wheels the GPU check needs that the GPU image lacks, for CPython 3.12 on
manylinux x86-64, downloaded into .whl/ (ignored by git, carried to the device with carry [".whl"]).

    python -m benchmarks.gpu_check.wheels [--dest .whl] [--max-mib 40]

The image (Python 3.12, torch 2.11 CUDA 13, triton 3.6, transformers 5.17, peft, pytest, numpy,
accelerate, pandas, pyarrow, xxhash, fsspec, huggingface-hub, ...) has no liger-kernel, trl or
vllm, and nothing can be installed from the network there. Each wheel below is pinned to the
version the check was tested with here, and is fetched alone (--no-deps): the list names every
dependency the image lacks, and nothing it has. All of them are pure Python. crisp-fast itself is
not a wheel: the check runs from the working tree (the device tool copies the tracked files) and
needs no native extension on the GPU. Wheels in --dest that are not in the list are removed, so
exactly one version of each travels (two would stop pip's install there). Fails above --max-mib.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

# (distribution, version, why the check needs it)
WHEELS = (
    ("liger-kernel", "0.8.5", "Liger's Triton LigerFusedLinearJSD baseline; its model patches in the trainer"),
    ("trl", "1.16.0", "TRL's ChunkedDivergenceFunction baseline"),
    ("datasets", "5.2.0", "imported by trl.trainer.utils, which trl.kernels.chunked_divergence imports"),
    ("dill", "0.4.1", "a dependency of datasets the image lacks"),
    ("multiprocess", "0.70.19", "a dependency of datasets the image lacks"),
)
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
MAX_MIB = 40.0


def wheel_distribution(filename: str) -> str:
    """'trl-1.16.0-py3-none-any.whl' -> 'trl' (normalised as PEP 503 does)."""
    return re.sub(r"[-_.]+", "-", filename.split("-")[0]).lower()


def download_command(name: str, version: str, dest: str) -> list[str]:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", PYTHON_VERSION, "--implementation", "cp", "--dest", dest]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    return command + [f"{name}=={version}"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", default=".whl")
    parser.add_argument("--max-mib", type=float, default=MAX_MIB)
    args = parser.parse_args(argv)
    os.makedirs(args.dest, exist_ok=True)
    for name, version, _ in WHEELS:
        print(f"gpu-wheels: {name}=={version}", flush=True)
        subprocess.run(download_command(name, version, args.dest), check=True, stdout=subprocess.DEVNULL)

    wanted = {re.sub(r"[-_.]+", "-", name).lower(): version for name, version, _ in WHEELS}
    files = sorted(name for name in os.listdir(args.dest) if name.endswith(".whl"))
    for filename in files:
        distribution, version = wheel_distribution(filename), filename.split("-")[1]
        if wanted.get(distribution) != version:
            print(f"gpu-wheels: removing {filename} (not in the list)")
            os.remove(os.path.join(args.dest, filename))
    files = sorted(name for name in os.listdir(args.dest) if name.endswith(".whl"))
    missing = sorted(set(wanted) - {wheel_distribution(name) for name in files})
    if missing:
        print(f"gpu-wheels: missing after download: {missing}", file=sys.stderr)
        return 1
    total = 0
    for filename in files:
        size = os.path.getsize(os.path.join(args.dest, filename))
        total += size
        print(f"  {size / 2**20:6.2f} MiB  {filename}")
    print(f"gpu-wheels: {len(files)} wheels, {total / 2**20:.2f} MiB in {args.dest}/ (limit {args.max_mib:.0f} MiB)")
    if total > args.max_mib * 2**20:
        print(f"gpu-wheels: {total / 2**20:.2f} MiB is over the {args.max_mib:.0f} MiB limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
