# Two entry points (see README): `make demo` and `make test`. Both set up everything on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CACHE ?= $(HOME)/.cache/hf_moe

.PHONY: venv demo test test-core test-vllm vllm-env clean

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

test-core: venv
	$(BIN)/python -m pytest -m "not vllm" -q

vllm-env:
	bash scripts/vllm_env.sh

test-vllm: vllm-env
	bash scripts/run_vllm_tests.sh

test: test-core test-vllm

clean:
	rm -rf $(VENV) .venv-vllm
