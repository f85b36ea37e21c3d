# The two commands: `make up` runs the whole system, `make test` runs the tests.
# Both create (or reuse) the project virtualenv .venv and install the pinned dependencies
# (requirements.txt) and the six project distributions into it first. `make test` (and
# `make install`) also install Debian's `chromium` when /usr/bin/chromium is missing: the
# dashboard test drives it headless (as root with apt-get; otherwise it says what to do).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.specedge-installed
DISTS  := libs gateway scheduler verifier edge-agent bench
PYPROJECTS := $(foreach d,$(DISTS),$(d)/pyproject.toml)
PYTEST_ARGS ?=

.PHONY: up test soak conformance lint install browser models clean help

help:
	@echo "make up      run nats-server, redis-server and the four services (Ctrl-C stops all)"
	@echo "make test    run the test suite (unit, integration with real servers, end to end)"
	@echo "make soak    load test: 64 streaming clients for 5 minutes against specedge up (docs/benchmarks.md)"
	@echo "make conformance  aiperf and lm-eval against specedge up (own virtualenv; docs/benchmarks.md)"
	@echo "make lint    ruff"
	@echo "make models  retrain the bundled tiny models (about 45 minutes on 2 CPU cores; not in CI)"

install: $(STAMP) browser

$(STAMP): requirements.txt $(PYPROJECTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
		$(foreach d,$(DISTS),-e ./$(d))
	$(BIN)/python -m pip check
	touch $@

# Idempotent: nothing to do when chromium is there; apt-get update only when the install
# cannot find the package without it.
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing Debian chromium (for the dashboard test)"; \
			export DEBIAN_FRONTEND=noninteractive; \
			apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
				|| { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; } \
				|| exit 1; \
		else \
			echo "note: no /usr/bin/chromium; install Debian's chromium (apt-get install chromium)" \
				"or the dashboard test is skipped"; \
		fi; \
	fi

up: $(STAMP)
	$(BIN)/specedge up

test: $(STAMP) browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The short variant (8 clients, 20 s) runs in `make test`; this is the full one.
SOAK_CLIENTS ?= 64
SOAK_SECONDS ?= 300
soak: $(STAMP)
	SPECEDGE_SOAK_CLIENTS=$(SOAK_CLIENTS) SPECEDGE_SOAK_SECONDS=$(SOAK_SECONDS) SPECEDGE_SOAK_REPORT=soak-report.json \
		$(BIN)/python -m pytest tests/e2e/test_soak.py -s -p no:cacheprovider $(PYTEST_ARGS)

# Real clients (aiperf, lm-eval) against `specedge up`, from their own virtualenv: their
# dependencies pin versions the project's do not, and they take minutes (not in `make test`).
CONFORMANCE_VENV ?= .venv-conformance
CONFORMANCE_STAMP := $(CONFORMANCE_VENV)/.specedge-installed
$(CONFORMANCE_STAMP): tests/conformance/requirements.txt
	test -x $(CONFORMANCE_VENV)/bin/python || $(PYTHON) -m venv $(CONFORMANCE_VENV)
	$(CONFORMANCE_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r tests/conformance/requirements.txt
	touch $@

conformance: $(STAMP) $(CONFORMANCE_STAMP)
	SPECEDGE_CONFORMANCE_TOOLS=$(CONFORMANCE_VENV)/bin SPECEDGE_CONFORMANCE_REPORT=conformance-report.json \
		$(BIN)/python -m pytest tests/conformance -p no:cacheprovider $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

models: $(STAMP)
	$(BIN)/python models/train_tiny_pair.py

clean:
	rm -rf $(VENV) $(CONFORMANCE_VENV) .pytest_cache .ruff_cache
