# The two set-up commands a new user runs: `make run` (the demo) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CODE := producer worker shared

.PHONY: run test test-slow chaos soak lint typecheck unit bench bench-smoke install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[worker,local-api]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: install
	$(BIN)/batchbridge demo

lint: install-dev
	$(BIN)/ruff check $(CODE) tests bench
	$(BIN)/ruff format --check $(CODE) tests bench

typecheck: install-dev
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest -q -m "not slow and not chaos and not soak"

# The long end-to-end scenarios (20 s to minutes each: the ledgers, whole stacks started with
# `batchbridge up`, a fresh install); CI runs them after `make test`.
test-slow: install-dev
	$(BIN)/python -m pytest -q -m "slow and not chaos and not soak"

# The whole fault suite (tests/reliability: the fast subset and the chaos scenarios). Each
# scenario prints its ledger; the ledgers go into tests/reliability/RESULTS.md, pass or fail.
LEDGERS := $(CURDIR)/.chaos-ledgers
chaos: install-dev
	rm -rf $(LEDGERS)
	BATCHBRIDGE_TEST_LEDGER_DIR=$(LEDGERS) BATCHBRIDGE_TEST_FUZZ_EXAMPLES=1000 \
		$(BIN)/python -m pytest -q -s -m "not soak" tests/reliability; \
	status=$$?; $(BIN)/python -m tests.reliability.results $(LEDGERS) "make chaos"; exit $$status

# 100,000 requests over 30 minutes with a random kill every minute (BATCHBRIDGE_TEST_SOAK_MINUTES).
soak: install-dev
	rm -rf $(LEDGERS)
	BATCHBRIDGE_TEST_LEDGER_DIR=$(LEDGERS) $(BIN)/python -m pytest -q -s -m soak tests/reliability; \
	status=$$?; $(BIN)/python -m tests.reliability.results $(LEDGERS) "make soak"; exit $$status

# Every benchmark case on one Redis, against its baseline in the same run (7-10 min): writes
# bench/results/latest.md and latest.json, and fails when a target is missed.
bench: install-dev
	$(BIN)/python -m bench

# Every case at a small size (~1.5 min): proves the benchmarks run; says nothing about targets.
bench-smoke: install-dev
	$(BIN)/python -m bench --smoke

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
