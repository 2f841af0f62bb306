# HelixNet Core. `make run` starts the whole service; `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PYTHONPATH := $(CURDIR)

.PHONY: install setup run test lint typecheck bench-store bench-replay bench-jobs clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

setup: install
	$(BIN)/python -m command_api.setup

run: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/honcho start -f Procfile

test: install
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy shared command_api query_api projectors workers gateway
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy shared command_api query_api projectors workers gateway

bench-store: install
	$(BIN)/python -m tests.benchmarks.bench_store

bench-replay: install
	$(BIN)/python -m tests.benchmarks.bench_replay

bench-jobs: install
	$(BIN)/python -m tests.benchmarks.bench_jobs

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
