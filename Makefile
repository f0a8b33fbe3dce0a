# Two entry points (see README): `make demo` and `make test`. Both set up everything on a fresh machine.
# For the edit-test loop: `make test-fast` (no slow, vLLM or GPU tests) and `make lint`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CACHE ?= $(HOME)/.cache/hf_moe

.PHONY: venv demo lint format test test-fast test-core test-vllm vllm-env clean

$(BIN)/.installed: pyproject.toml requirements/ci.txt scripts/install_torch.sh
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch's CPU build first (a local wheel if pip finds one, else PyTorch's CPU index): PyPI's torch for
	# Linux is the CUDA build, several GB with its NVIDIA libraries. TORCH_SPEC=torch==2.13.0 takes PyPI's.
	bash scripts/install_torch.sh $(BIN)/python
	$(BIN)/pip install -q -c requirements/ci.txt -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python examples/demo.py --cache-dir $(CACHE)

# ruff (lint + format check) over the Python trees, then pyright (basic mode, hf_moe/; see pyproject.toml).
LINT_PATHS := hf_moe tests benchmarks examples

lint: venv
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/pyright --pythonpath $(BIN)/python

format: venv
	$(BIN)/ruff check --fix $(LINT_PATHS)
	$(BIN)/ruff format $(LINT_PATHS)

# The fast loop: everything but the slow (real weights, PyPI downloads, multi-process), vLLM and GPU tests.
test-fast: venv
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -m "not slow and not vllm and not gpu" -x -q

test-core: venv
	$(BIN)/python -m pytest -m "not vllm" -q

vllm-env:
	bash scripts/vllm_env.sh

test-vllm: vllm-env
	bash scripts/run_vllm_tests.sh

test: test-core test-vllm

clean:
	rm -rf $(VENV) .venv-vllm
