# `make demo` and `make test` set everything up on a fresh clone: a .venv, the package, the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# pip reinstalls only when pyproject.toml changed since the last install.
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/swav train config=quickstart

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf checkpoints/quickstart
