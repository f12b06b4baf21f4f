# najimi — every task starts here. `make run` and `make test` set up everything on a
# fresh machine (a virtual environment in .venv with all declared dependencies).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
PROTO_FILES := $(shell find protos -name '*.proto' | sort)
GEN := shared/gen
PYTEST_ARGS ?=

.PHONY: help venv run test test-postgres fuzz lint protos protos-check bench clean

help:
	@echo "make run          start all four services on SQLite with demo data (Ctrl-C stops them)"
	@echo "make test         run the test suite (PostgreSQL tests start their own throwaway cluster)"
	@echo "make fuzz         fuzz every RPC with many more generated requests than make test sends"
	@echo "make lint         ruff, mypy and buf lint"
	@echo "make protos       regenerate the Python stubs from protos/"
	@echo "make protos-check fail when the committed stubs are stale"
	@echo "make bench        run the benchmarks under bench/"

venv: $(STAMP)

# LightFM 1.17 only builds without build isolation, against an already installed
# setuptools/wheel/numpy/scipy, and only through pip's legacy setup.py path, which
# pip 25 removed: hence the pinned pip and the order of these steps.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet 'pip<25' 'setuptools<80' wheel 'numpy>=1.26' 'scipy>=1.11'
	$(BIN)/pip install --quiet --no-build-isolation 'lightfm==1.17'
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m services

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The PostgreSQL-backed tests alone; they fail (instead of skipping) when no cluster can start.
test-postgres: $(STAMP)
	NAJIMI_TEST_REQUIRE_POSTGRES=1 $(PY) -m pytest -m postgres $(PYTEST_ARGS)

# The fuzz tests alone, with the `fuzz` Hypothesis profile: many examples per RPC, new ones
# every run (make test runs the same tests with a few fixed ones). FUZZ_EXAMPLES=N sets how many.
FUZZ_EXAMPLES ?=
fuzz: $(STAMP)
	NAJIMI_FUZZ_PROFILE=fuzz NAJIMI_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/fuzz --timeout=0 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check services shared tests $(wildcard bench)
	$(BIN)/ruff format --check services shared tests $(wildcard bench)
	$(BIN)/mypy services shared
	cd protos && ../$(BIN)/buf lint

protos: $(STAMP)
	rm -rf $(GEN)/najimi
	$(PY) -m shared.protogen $(GEN)

protos-check: $(STAMP)
	$(PY) -m shared.protogen --check $(GEN)

bench: $(STAMP)
	@for b in $(wildcard bench/*_bench.py); do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache data
