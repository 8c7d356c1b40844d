# Twiscope: install, run, test.
#
#   make run [REPLAY=path/to/archive SPEED=60|max PORT=8000]
#                      the whole platform, supervised (web, a worker per queue, beat;
#                      embedded PostgreSQL/Redis unless DATABASE_URL/REDIS_URL)
#   make test [PYTEST_ARGS="tests/test_x.py -k y"] [SERVICES_ARGS=--embedded]
#   make bench         bench/replay_throughput.py against the local services
#   make lint          ruff, mypy and the import contracts (lint-imports)
#   make venv          .venv with requirements.txt (re-installed when it changes)
#
# Where PostgreSQL and Redis come from: devtools/localservices.py.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BOOTSTRAP ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# --embedded: private PostgreSQL/Redis even when servers answer on the default ports.
SERVICES_ARGS ?=
BENCH_ARGS ?=

# make passes command-line variables (REPLAY=..., SPEED=..., PORT=...) to recipes in
# their environment; devtools.run reads them from there and treats empty as unset.

.PHONY: help venv run test bench lint

help:
	@sed -n '3,10p' Makefile | sed 's/^# \{0,1\}//'

venv: $(STAMP)

# Re-install only when requirements.txt is newer than the stamp, so a second
# `make test` starts at once.
$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $(STAMP)

# devtools.run restarts a process that dies (supervisord, devtools/supervisord.conf); other
# terminals find the platform through .run/env, which devtools.localservices writes.
run: venv
	$(PY) -m devtools.localservices run -- $(PY) -m devtools.run

# docker-compose (v1, Debian's package) lets tests/test_deploy.py validate
# docker-compose.yml without a Docker engine. Installed only when missing, with apt-get,
# as root; a failure is tolerated here: that test then skips (or fails when CI=true).
test: venv
	@if ! command -v docker-compose >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
	    && [ "$$(id -u)" = 0 ]; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y --no-install-recommends docker-compose >/dev/null 2>&1 \
	  || { apt-get update >/dev/null 2>&1 \
	       && apt-get install -y --no-install-recommends docker-compose >/dev/null 2>&1; } \
	  || echo "make: could not install docker-compose; tests/test_deploy.py will skip (or fail under CI=true)" >&2; \
	fi
	$(PY) -m devtools.localservices test $(SERVICES_ARGS) -- $(PY) -m pytest $(PYTEST_ARGS)

# Its own run dir (and env file: .run/bench/env), so it works on its own data while
# `make run` is up and leaves that platform's .run/env alone.
bench: venv
	$(PY) -m devtools.localservices run --run-dir .run/bench -- $(PY) bench/replay_throughput.py $(BENCH_ARGS)

# ruff and mypy are development tools, not dependencies of the platform: installed on
# demand from requirements-dev.txt.
lint: venv
	@$(PY) -m pip install --quiet -r requirements-dev.txt
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(PY) -m devtools.localservices test $(SERVICES_ARGS) -- $(VENV)/bin/mypy .
