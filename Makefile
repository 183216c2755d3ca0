# Two commands set up a fresh machine and run Stagewise:
#   make quickstart   -- install, then run the main job
#   make test         -- install, then run the test suite
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install quickstart test bench

$(BIN)/stagewise: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/stagewise

install: $(BIN)/stagewise

quickstart: install
	$(BIN)/stagewise split stagewise.zoo.basic:large_model --stages 2
	OMP_NUM_THREADS=1 $(BIN)/stagewise train stagewise.zoo.basic:mlp --stages 2 --steps 150 --global-batch 64 \
		--lr 2e-3 --save runs/quickstart
	$(BIN)/python examples/serve_digits.py runs/quickstart

test: install
	$(BIN)/ruff check src tests bench examples
	$(BIN)/lint-imports
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q
