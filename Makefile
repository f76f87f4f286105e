# symgate: `make demo` runs the main job, `make test` the whole test suite.
# Each creates a local virtual environment (.venv) and installs what it needs.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.symgate-installed

.PHONY: demo test test-fast test-slow bench mutation install clean

# the built-in cells' kernels are generated and compiled at install: reinstall when the generator changes
$(STAMP): pyproject.toml setup.py $(wildcard symgate/_codegen/*.py symgate/_derive/*.py) symgate/_build.py symgate/cells.py symgate/_aot.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m symgate demo

# The fast default suite, then the thorough profile (slow-marked tests,
# 200-example Hypothesis runs, the random-cell pool).  pytest exits 5 when it
# collects no test; make treats that as a failure, so an empty run cannot pass.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"
	$(PY) -m pytest -q -m slow --hypothesis-profile=thorough

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow --hypothesis-profile=thorough

BENCH_STAMP := $(VENV)/.symgate-bench-installed
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check 'torch==2.13.0' 'jax>=0.4.30'
	$(MAKE) -f ../shared/bench-ref/Makefile OUT=build/cref PY=$(PY) || echo "(C reference not built: ../shared/bench-ref missing)"
	@touch $(BENCH_STAMP)

# kernels vs numpy reference, PyTorch, JAX and the hand-written C reference; then derivation speed
bench: $(BENCH_STAMP)
	$(PY) benchmarks/bench_kernels.py
	$(PY) benchmarks/bench_derive.py

# mutation testing of the core modules against their test files (under an hour on 2 cores; not part of
# `make test`).  Options: make mutation MUTATION_ARGS="--modules _functions --sample 5 --seed 1 --jobs 2"
# (--list shows the mutants without running; --scope full adds the rest of the fast suite)
MUTATION_ARGS ?=
mutation: $(STAMP)
	$(PY) tools/mutation.py $(MUTATION_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
