# CAO Gateway: `make run` starts the whole stack locally, `make test` runs the suite.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | cksum | cut -d' ' -f1)

.PHONY: help install backends test-backends browser run serve test fuzz lint bench mutate clean

help:
	@echo "make run     set up, start the whole stack and run a demo job"
	@echo "make serve   set up and start the whole stack, no demo job"
	@echo "make test    set up and run the test suite"
	@echo "make fuzz    explore the API with fresh random inputs (FUZZ_EXAMPLES=300 per operation)"
	@echo "make lint    check the dependency direction between apps, and pyflakes"
	@echo "make mutate mutation testing of the decision modules (docs/TESTING.md)"
	@echo "make bench   start the stack and run the benchmark suite (BENCH_ARGS=--quick, --only ..., --app-root DIR)"

$(PY):
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or set PYTHON=/path/to/python3.11"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "error: Python 3.11 or newer is needed ($(PYTHON) is $$($(PYTHON) -V 2>&1))"; exit 1; }
	$(PYTHON) -m venv $(VENV) || { echo "error: could not create a virtualenv; on Debian/Ubuntu install python3-venv"; exit 1; }

$(STAMP): requirements.txt requirements-dev.txt | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

backends: install
	@$(PY) scripts/local_backends.py

# The tests also use RabbitMQ (the engine's tests run on both brokers).
test-backends: install
	@$(PY) scripts/local_backends.py --rabbitmq

run: backends
	$(PY) -m scripts.stack --demo

serve: backends
	$(PY) -m scripts.stack

# The browser tests drive Debian's Chromium; install it when missing.
CHROMIUM ?= /usr/bin/chromium
browser:
	@if [ ! -x "$(CHROMIUM)" ]; then \
	  if ! command -v apt-get >/dev/null; then \
	    echo "warning: Chromium not found at $(CHROMIUM) and no apt-get here; browser tests will be skipped."; exit 0; fi; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; else \
	    echo "warning: Chromium is missing; install it (apt-get install chromium chromium-driver) to run the browser tests."; exit 0; fi; \
	  echo "Installing Chromium for the browser tests (Debian packages chromium, chromium-driver)..."; \
	  $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
	    || { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null; } \
	    || echo "warning: could not install Chromium; browser tests will be skipped."; \
	fi

lint: install
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .

# On a redis-server and database names of this run's own (scripts/isolated_pytest.py),
# so two suites on one machine never clobber each other.
test: test-backends lint browser
	$(PY) -m scripts.isolated_pytest $(PYTEST_ARGS)

# Property-based tests with fresh random draws and more examples; `make test`
# under CI=true runs the same tests derandomized, so CI is reproducible.
FUZZ_EXAMPLES ?= 300
fuzz: backends
	CAO_HYPOTHESIS_PROFILE=explore CAO_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/test_fuzz.py tests/test_limiter.py -k "fuzz or any_ or Model" -p no:cacheprovider $(PYTEST_ARGS)

# Mutation testing of the decision modules with their fast unit tests (docs/TESTING.md); not
# part of `make test`. mutmut skips module-level data, so the transition table has its own runner.
# Its own databases, so it can run beside a test run. mutants/ is removed first: mutmut's cache
# does not always notice changed tests, and a stale survivor would misstate the score.
MUTATE_DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/cao_mutate
MUTATE_REDIS_URL ?= redis://127.0.0.1:6379/13
mutate: backends
	rm -rf mutants
	DATABASE_URL=$(MUTATE_DATABASE_URL) REDIS_URL=$(MUTATE_REDIS_URL) $(VENV)/bin/mutmut run --max-children 1
	$(PY) -m tests.mutation_score
	DATABASE_URL=$(MUTATE_DATABASE_URL) REDIS_URL=$(MUTATE_REDIS_URL) $(PY) -m tests.mutate_transitions

# Figures in .run/bench/ and docs/PERFORMANCE.md; see benchmarks/run_all.py for BENCH_ARGS.
bench: backends
	$(PY) -m benchmarks.run_all $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .run staticfiles mutants
