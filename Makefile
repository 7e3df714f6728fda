# raydrat: the two set-up commands are `make demo` and `make test`. Every target that runs
# Python creates the virtual environment first, so each works from a fresh clone.
#   make demo        install, build the embedded corpus, train the demo recipe
#   make test        the whole test suite (what CI runs)
#   make test-fast   every test not marked slow: the edit-test loop (under 5 minutes on 2 cores)
#   make lint        ruff: formatting check and lint (configured in pyproject.toml)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and pinned, so the package's range (>=2.4,<2.15) keeps it and pip
# never pulls a multi-GB build. Override e.g. `make demo TORCH_SPEC='torch==2.6.0'`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/raydrat data demo
	$(BIN)/raydrat train demo

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) data ray_results mlruns.db mlartifacts

# The CUDA figures on a GPU machine that has neither network access nor this environment.
# Here: `make gpu-carry` prepares .gpu-carry (pydantic wheels for Python 3.12, bitsandbytes
# trimmed to its CUDA 13 library). On the GPU machine, with .gpu-carry copied there:
# `make gpu-check OUT_DIR=...` installs them privately and runs `raydrat bench gpu`.
OUT_DIR ?= gpu-out
.PHONY: gpu-carry gpu-check
gpu-carry: $(STAMP)
	PYTHON=$(BIN)/python scripts/gpu-carry .gpu-carry

gpu-check:
	scripts/gpu-check $(OUT_DIR) $(BENCH_ARGS)
