# skinrisk: `make run` sets up .venv and runs the main job; `make test` runs the test suite.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export GX_ANALYTICS_ENABLED := False
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export TF_CPP_MIN_LOG_LEVEL := 2
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: help install run test test-fast lint format repro mlflow-ui benchmarks clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv
	$(BIN)/uv pip install --python $(BIN)/python -q -r requirements.lock
	$(BIN)/uv pip install --python $(BIN)/python -q --no-deps -e .
	touch $@

install: $(STAMP) ## create .venv with the pinned dependencies (requirements.lock)

run: $(STAMP) ## the main job: the training flow on the imported data, or the synthetic sample
	$(BIN)/skinrisk pipeline

test: $(STAMP) ## lint, then every test (slow ones included; CI runs this)
	$(BIN)/ruff check .
	$(BIN)/pytest

test-fast: $(STAMP) ## the tests not marked slow
	$(BIN)/pytest -m "not slow"

lint: $(STAMP) ## ruff lint and format check
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP) ## ruff format
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

repro: $(STAMP) ## dvc repro with the venv on PATH (imports the synthetic sample if no data was imported)
	$(BIN)/skinrisk data ensure
	$(BIN)/dvc repro

mlflow-ui: $(STAMP) ## the MLflow UI on http://127.0.0.1:5000 for the local SQLite store
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath mlflow.db) --host 127.0.0.1 --port 5000

benchmarks: $(STAMP) ## print the speed and quality figures (needs ../shared/data/ham10000-200px)
	$(BIN)/python benchmarks/preprocess_throughput.py

.PHONY: servers servers-status servers-stop benchmark-servers

servers: $(STAMP) ## MLflow + Prefect servers on the local PostgreSQL, no containers (prints the env to export)
	$(BIN)/python infra/servers.py start

servers-status: $(STAMP) ## pid, health and log of the team servers
	$(BIN)/python infra/servers.py status

servers-stop: $(STAMP) ## stop the team servers (their databases and artifacts stay)
	$(BIN)/python infra/servers.py stop

benchmark-servers: $(STAMP) ## server start times and flow overhead vs the embedded default (needs PostgreSQL)
	$(BIN)/python benchmarks/server_overhead.py

clean: ## remove outputs (not the venv, not the raw import)
	rm -rf data/processed reports models .pytest_cache
