# raydrat: the two set-up commands are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and pinned, so the package's range (>=2.4,<2.15) keeps it and pip
# never pulls a multi-GB build. Override e.g. `make demo TORCH_SPEC='torch==2.6.0'`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv demo test clean

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

clean:
	rm -rf $(VENV) data ray_results mlruns.db mlartifacts

# The GPU check (issue: prove it on a GPU). Here: `make gpu-carry` prepares .gpu-carry (pydantic
# wheels for Python 3.12, bitsandbytes trimmed to its CUDA 13 library). On the GPU machine, with
# .gpu-carry carried: `make gpu-check OUT_DIR=...` installs them privately and runs `bench gpu`.
OUT_DIR ?= gpu-out
.PHONY: gpu-carry gpu-check
gpu-carry:
	PYTHON=$(BIN)/python scripts/gpu-carry .gpu-carry

gpu-check:
	scripts/gpu-check $(OUT_DIR) $(BENCH_ARGS)
