# The two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SERVICES := $(PY) deploy/local/services.py

.PHONY: setup run test lint fmt unit integration services services-stop services-env bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@echo "==> setting up $(VENV) (first time takes a minute or two)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --upgrade pip
	@# The build backend is verbose; its log is shown only if the install fails.
	@$(PY) -m pip install --progress-bar off -e '.[dev]' > $(VENV)/install.log 2>&1 \
		|| { tail -40 $(VENV)/install.log; echo "install failed: full log in $(VENV)/install.log"; exit 1; }
	@touch $@

run: setup
	$(VENV)/bin/shapstream run

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
