# Quick start: `make run` trains the default algorithm on MPE simple_spread; `make test` runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned to the CPU wheel, so no later step can pull a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,mujoco,ray,magent]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/pamarl train

# Whole test files run in parallel processes (one per core): the learning tests are single-threaded.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/pamarl bench

clean:
	rm -rf $(VENV) runs
