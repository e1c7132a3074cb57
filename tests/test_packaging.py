"""A non-editable install ships the Triton kernels inside the package as `crisp_fast.kernels`
(never as a top-level `kernels`, a name an unrelated PyPI package owns)."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_kernels_inside_the_package(tmp_path):
    env = {**os.environ, "CRISP_FAST_NO_NATIVE": "1"}  # the native build is exercised by `make test` itself
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True, env=env, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("crisp_fast-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "crisp_fast/kernels/__init__.py" in names
    assert any(name.startswith("crisp_fast/kernels/divergence_") for name in names)
    assert not any(name.startswith("kernels/") for name in names)

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    probe = ("import crisp_fast, crisp_fast.kernels, crisp_fast.backends.triton as t; "
             "assert crisp_fast.__file__.startswith(%r), crisp_fast.__file__; print('ok')" % str(target))
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(target)})
    assert result.returncode == 0, result.stderr
