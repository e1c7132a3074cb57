# Two commands for a fresh machine: `make demo` (the main job on its embedded default) and
# `make test`. Each builds the virtual environment it needs first.
#   TORCH_SPEC  the torch requirement; torch==2.13.0 is the CPU wheel these machines carry.
#               On a CUDA machine use e.g. `make test TORCH_SPEC=torch`.
#   PYTEST_ARGS extra pytest arguments, e.g. PYTEST_ARGS="-k loss -x".
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.crisp-fast-installed

.PHONY: venv test test-slow demo bench bench-quick clean

venv: $(STAMP)

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q -m "not slow" tests $(PYTEST_ARGS)

test-slow: venv
	$(PY) -m pytest -q -m slow tests $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/crisp-fast demo $(DEMO_ARGS)

bench: venv
	$(PY) -m pytest -q -s benchmarks $(PYTEST_ARGS)

bench-quick: venv
	$(PY) -m pytest -q -s benchmarks --quick $(PYTEST_ARGS)

clean:
	rm -rf build dist *.egg-info crisp_fast/_native*.so
