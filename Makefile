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
DATA_DIR := $(or $(NAJIMI_DATA_DIR),data)

.PHONY: help venv run reset test test-postgres fuzz lint protos protos-check bench h2load clean deploy-check

help:
	@echo "make run          start all four services on SQLite with demo data (Ctrl-C stops them)"
	@echo "                  DEMO=0: without the demo data; LOG=info: service logs on the console too"
	@echo "make reset        remove the data directory (databases, logs, tokens); keeps .venv"
	@echo "make clean        remove .venv, the caches and the data directory"
	@echo "make test         run the test suite (PostgreSQL tests start their own throwaway cluster)"
	@echo "make fuzz         fuzz every RPC with many more generated requests than make test sends"
	@echo "make lint         ruff, mypy and buf lint"
	@echo "make protos       regenerate the Python stubs from protos/"
	@echo "make protos-check fail when the committed stubs are stale"
	@echo "make bench        run the benchmarks under bench/ (h2load: installed when root, else how)"
	@echo "make deploy-check render and check the image and Kubernetes manifests under deploy/"

venv: $(STAMP)

# pip's own lines are cut down to what it is fetching and building, so the minute or
# so of a first install shows progress without pages of output.
PIP := set -o pipefail; $(BIN)/pip install --progress-bar off
PIP_SHOW := sed -un -E -e 's/^Collecting ([^ ;]*).*/      fetching \1/p' \
  -e 's/^Building wheel for ([^ ]*).*/      building \1/p' -e 's/^Installing collected packages.*/      installing/p'

$(STAMP): pyproject.toml
	@echo "Setting up $(VENV) (first run only; about a minute):"
	@echo "  [1/2] creating the virtual environment with $(PYTHON)"
	@$(PYTHON) -m venv $(VENV)
	@echo "  [2/2] installing najimi and its dependencies (gRPC, SQLAlchemy, LightFM, ...; dev tools)"
	@$(PIP) -e '.[dev]' | $(PIP_SHOW)
	@touch $(STAMP)
	@echo "  $(VENV) is ready."

# DEMO=0 starts without the demo data; LOG=info (or debug) also shows the services'
# info lines on the console (they are always in $(DATA_DIR)/<service>.log).
DEMO ?= 1
LOG ?=
run: $(STAMP)
	$(if $(LOG),NAJIMI_CONSOLE_LEVEL=$(LOG) )$(PY) -m services$(if $(filter 0 no false,$(DEMO)), --no-demo)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The PostgreSQL-backed tests alone; they fail (instead of skipping) when no cluster can start.
test-postgres: $(STAMP)
	NAJIMI_TEST_REQUIRE_POSTGRES=1 $(PY) -m pytest -m postgres $(PYTEST_ARGS)

# deploy/: the Dockerfile and every Kustomize overlay, rendered, schema-validated and checked
# (these tests also run in `make test`).
deploy-check: $(STAMP)
	$(PY) -m pytest tests/deploy $(PYTEST_ARGS)

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
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache $(DATA_DIR)

# The services' state (databases, logs, tokens, keys, demo data); .venv stays.
.PHONY: reset
reset:
	rm -rf $(DATA_DIR)
