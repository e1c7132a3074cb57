# Two commands for a fresh machine: `make demo` (the main job on its embedded default) and
# `make test`. Each builds the virtual environment it needs first.
#   TORCH_SPEC  the torch requirement; torch==2.13.0 is the CPU wheel these machines carry.
#               On a CUDA machine use e.g. `make test TORCH_SPEC=torch`.
#   PYTEST_ARGS extra pytest arguments, e.g. PYTEST_ARGS="-k loss -x".
# The GPU check (docs/benchmarks.md, "Running the GPU check on a lent machine"):
#   make gpu-wheels      here: the wheels the GPU image lacks, into .whl/ (carried to the device)
#   make gpu-check       on the GPU machine: installs .whl/*.whl into $(GPU_SITE), runs the check
#   make gpu-check GPU_CHECK_ARGS=--dry-run   the same code paths on CPU at tiny shapes (CI)
#   make sm90-triton36   here: every kernel compiled ahead of time for sm_90 with triton 3.6
#   GPU_PYTHON  the interpreter for gpu-check: .venv's if there is one, else python3 (the image's)
#   GPU_CHECK_OUT  where gpu_check.json / .md / .log go (default benchmarks/results)
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.crisp-fast-installed

GPU_PYTHON    ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_SITE      ?= .gpu-site
GPU_CHECK_OUT ?= benchmarks/results
GPU_CHECK_ARGS ?=
# the dry run uses the packages installed here; the GPU run installs the carried wheels first
GPU_CHECK_INSTALL ?= $(if $(findstring --dry-run,$(GPU_CHECK_ARGS)),0,1)
TRITON_COMPAT ?= 3.6.*

.PHONY: venv test test-slow demo bench bench-quick clean gpu-wheels gpu-check sm90-triton36

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

gpu-wheels:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m benchmarks.gpu_check.wheels --dest .whl --max-mib 40

gpu-check:
	@if [ "$(GPU_CHECK_INSTALL)" = 1 ] && ls .whl/*.whl >/dev/null 2>&1; then \
	  echo "gpu-check: installing $$(ls .whl/*.whl | wc -l) carried wheels into $(GPU_SITE)/"; \
	  rm -rf $(GPU_SITE) && $(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile \
	    --disable-pip-version-check --target $(GPU_SITE) .whl/*.whl || exit 1; \
	else echo "gpu-check: no wheels installed (dry run, or no .whl/: make gpu-wheels); using $(GPU_PYTHON)'s packages"; fi
	PYTHONPATH="$(CURDIR):$(CURDIR)/$(GPU_SITE)$${PYTHONPATH:+:$$PYTHONPATH}" GPU_CHECK_OUT="$(GPU_CHECK_OUT)" \
	  $(GPU_PYTHON) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

# triton $(TRITON_COMPAT) in a throwaway --target folder that shadows the installed triton
sm90-triton36: venv
	@set -e; dir=$$(mktemp -d); trap 'rm -rf "$$dir"' EXIT; \
	$(PY) -m pip install -q --no-deps --disable-pip-version-check --target "$$dir" "triton==$(TRITON_COMPAT)"; \
	env -u TRITON_INTERPRET PYTHONPATH="$$dir:$(CURDIR)" $(PY) -m benchmarks.gpu_check.sm90_compat --expect-triton "$(TRITON_COMPAT)"

clean:
	rm -rf build dist *.egg-info crisp_fast/_native*.so
