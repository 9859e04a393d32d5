# The two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
# A new venv is made with PYTHON (default: python3.11, else python3), which must be Python
# 3.11: `make run PYTHON=/path/to/python3.11` names another.
VENV ?= .venv
PY := $(VENV)/bin/python
SERVICES := $(PY) deploy/local/services.py
# Where `make run` listens: `make run PORT=8001`.
HOST ?= 127.0.0.1
PORT ?= 8000
export PYTHON VENV

.PHONY: setup setup-run run test lint fmt unit integration services services-stop services-env bench clean

# Everything: the service, and the tools of the tests, lint and benchmarks (`dev` extra).
# Both setups rebuild a venv made by another Python, or one that no longer works.
setup:
	@bash deploy/local/setup.sh dev

# Only what running the service needs.
setup-run:
	@bash deploy/local/setup.sh run

run: setup-run
	@$(VENV)/bin/shapstream run --host $(HOST) --port $(PORT)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

fmt: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

unit: setup
	$(PY) -m pytest tests/unit

integration: setup
	$(PY) -m pytest tests/integration

services: setup
	$(SERVICES) start

services-stop:
	@if [ -x $(PY) ]; then $(SERVICES) stop; else echo "nothing to stop (no $(VENV))"; fi

services-env: setup
	@$(SERVICES) env

# Starts Kafka and Cassandra unless SHAPSTREAM_KAFKA_BOOTSTRAP / SHAPSTREAM_CASSANDRA_HOSTS
# point elsewhere, runs lint and every test, and stops what it started even when tests fail.
test: setup
	@bash deploy/local/test.sh

bench: setup
	@bash deploy/local/bench.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
