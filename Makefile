PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install install-dev run test lint migration

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt

install-dev: $(BIN)/python
	$(BIN)/pip install --quiet -r requirements-dev.txt -r requirements-otel.txt

run: install
	$(BIN)/python main.py serve

test: install-dev
	$(BIN)/python -m pytest

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

# After changing models.py: write the next migration file into migrations/.
migration: install-dev
	$(BIN)/tortoise -c settings.MIGRATIONS_CONFIG makemigrations
