# ECTrans developer and operator entry points. Everything runs inside .venv, created on demand.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The tested torch. CPU hosts (no nvidia-smi) also ask PyTorch's CPU index, whose `2.13.0+cpu`
# outranks PyPI's multi-GB CUDA build of 2.13.0; where that index cannot be reached (an offline
# mirror, a wheel on disk) pip says so once and takes what the configured indexes have. GPU hosts get
# PyPI's CUDA build. A torch already in .venv is kept: install your own build first (or set TORCH /
# TORCH_INDEX) to choose another.
TORCH  ?= torch==2.13.0
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,https://download.pytorch.org/whl/cpu)

.PHONY: install run test lint typecheck unit bench gpu-proof clean

$(BIN)/ectrans: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX) --retries 0 --timeout 10) "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/ectrans  ## create .venv with ECTrans and its dependencies

run: install  ## start Redis, dispatcher, worker and monitor locally
	$(BIN)/ectrans up

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest -q

test: lint typecheck unit  ## what CI runs

bench: install  ## every benchmark scenario at its quick size
	for s in baselines pipeline memory chaos durability scale mixed split gateway serve; do $(BIN)/ectrans bench $$s --quick --compact || exit 1; done

# On a host with one CUDA GPU: every CUDA figure in one call (about 8 minutes on an H100), written to
# docs/bench/gpu-proof.{json,md}. DRY=1 runs the same steps at their smallest size on the CPU and
# writes to a temporary folder (the suite runs it: tests/test_bench_gpu_proof.py).
# Needs no venv: on the GPU host the packages come from wheels on PYTHONPATH (docs/status.md).
gpu-proof:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) -m ectrans.bench.gpu_proof $(if $(DRY),--dry)

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
