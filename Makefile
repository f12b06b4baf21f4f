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

.PHONY: help venv run test test-postgres lint protos protos-check bench h2load clean deploy-check

help:
	@echo "make run          start all four services on SQLite with demo data (Ctrl-C stops them)"
	@echo "make test         run the test suite (PostgreSQL tests start their own throwaway cluster)"
	@echo "make lint         ruff, mypy and buf lint"
	@echo "make protos       regenerate the Python stubs from protos/"
	@echo "make protos-check fail when the committed stubs are stale"
	@echo "make bench        run the benchmarks under bench/ (h2load: installed when root, else how)"
	@echo "make deploy-check render and check the image and Kubernetes manifests under deploy/"

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

# deploy/: the Dockerfile and every Kustomize overlay, rendered, schema-validated and checked
# (these tests also run in `make test`).
deploy-check: $(STAMP)
	$(PY) -m pytest tests/deploy $(PYTEST_ARGS)

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

# The benches' load generator is h2load (Debian's nghttp2-client): installed here when
# apt-get can run as root, otherwise the target stops and says how to install it.
bench: $(STAMP) h2load
	@for b in $(wildcard bench/*_bench.py); do echo "== $$b"; $(PY) $$b || exit 1; done

h2load:
	@command -v h2load >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing h2load, the benches' load generator (apt-get install nghttp2-client)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client >/dev/null \
			|| { echo "make bench: apt-get could not install nghttp2-client (see above)"; exit 1; }; \
	else \
		echo "make bench needs h2load, the load generator. Install it with:"; \
		echo "  sudo apt-get install nghttp2-client    (Debian, Ubuntu)"; \
		echo "  brew install nghttp2                   (macOS)"; \
		exit 1; \
	fi

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache data
