# ECTrans developer and operator entry points. Everything runs inside .venv, created on demand.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU hosts get the CPU wheel; on a GPU host install your CUDA build of torch into .venv first
# (or set TORCH to the requirement you want) and it is kept.
TORCH  ?= torch==2.13.0

.PHONY: install run test lint typecheck unit bench clean

$(BIN)/ectrans: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
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
	for s in baselines pipeline memory chaos durability scale mixed split serve; do $(BIN)/ectrans bench $$s --quick --compact || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
