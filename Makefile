# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the tests).
# Both create .venv on first use: torch 2.13.0 (the CPU wheel on local disk), then this package;
# `make test` adds the test extra (pytest, ruff, hypothesis, ray, gradio, playwright).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-fast lint bench-speed clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $@

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: $(STAMP)
	$(BIN)/blendedit demo

test: $(TEST_STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/pytest

# The fast suite: the same without the tests marked slow (browser end-to-end runs, training
# runs, the GPU run's smoke), for the edit-test loop; CI runs `make test`.
test-fast: $(TEST_STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/pytest -m "not slow"

bench-speed: $(TEST_STAMP)
	$(BIN)/python benchmarks/speed.py

clean:
	rm -rf $(VENV) blendedit-out benchmarks/out
