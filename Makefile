# Twiscope: install, run, test.
#
#   make run [REPLAY=path/to/archive SPEED=60|max PORT=8000]
#                      the whole platform, supervised (web, a worker per queue, beat;
#                      embedded PostgreSQL/Redis unless DATABASE_URL/REDIS_URL)
#   make test [PYTEST_ARGS="tests/test_x.py -k y"] [SERVICES_ARGS=--embedded]
#   make bench         bench/replay_throughput.py against the local services
#   make bench-alerts [BENCH_ARGS="--share 0.25"]
#                      CrisisLexT26 events injected into the airline and TweetEval
#                      backgrounds (evaluate alerts): bench/results/alert_detection.json
#   make bench-api [BENCH_ARGS="--label after --duration 60"]
#                      50 locust clients over events, search, trends, alerts and stats,
#                      daphne on loopback, against the database of bench/api_data.py build
#                      (DATABASE_URL, REDIS_URL set): bench/results/api_load.json and .png
#   make chaos [CHAOS_ARGS="--short"]
#                      faults (worker, Redis, PostgreSQL kills; WebSocket drops) during a
#                      replay on embedded servers of .run/chaos: bench/results/chaos.json
#   make schema        docs/openapi.json regenerated (the reviewed API contract that
#                      tests/test_schema_snapshot.py compares the generated schema with)
#   make lint          ruff, mypy, the import contracts (lint-imports) and pip-audit
#                      over the locks (devtools/audit_deps.py)
#   make venv          .venv from the lock requirements/dev.txt (re-installed when it changes)
#   make lock [LOCK_ARGS="--upgrade-package NAME"]
#                      requirements/*.txt from requirements/*.in, with hashes (pip-tools)
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
CHAOS_ARGS ?=
# Extra pip-compile options for `make lock`: --upgrade-package NAME, or --upgrade. (No
# PIP_ prefix on these names: make exports command-line variables, and pip reads PIP_*.)
LOCK_ARGS ?=
LOCK_TOOL ?= $(VENV)/bin/pip-compile
# Hashes for every file; pip and setuptools pinned too (--require-hashes refuses an
# unpinned one); no index, find-links or host of the machine that ran it.
LOCK_FLAGS := --quiet --generate-hashes --allow-unsafe --strip-extras \
	--no-emit-index-url --no-emit-find-links --no-emit-trusted-host --no-emit-options
LOCK := CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_TOOL) $(LOCK_FLAGS) $(LOCK_ARGS)

# make passes command-line variables (REPLAY=..., SPEED=..., PORT=...) to recipes in
# their environment; devtools.run reads them from there and treats empty as unset.

.PHONY: help venv lock run test bench bench-alerts bench-api chaos lint schema

help:
	@sed -n '3,25p' Makefile | sed 's/^# \{0,1\}//'

venv: $(STAMP)

# Re-install only when the lock is newer than the stamp, so a second `make test` starts
# at once. README.md ("Dependencies") says what each lock holds.
$(STAMP): requirements/dev.txt
	@test -x $(PY) || $(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes -r requirements/dev.txt
	@touch $(STAMP)

# The locks, each from its .in file; ml.txt is constrained by base.txt and dev.txt by
# ml.txt, so a package has one version in all three. ml.txt (the ML image) is resolved
# against the package index alone, whose torch wheel for Linux x86_64 is CUDA-enabled (the
# GPU pool needs it); dev.txt takes the torch wheel this machine's pip finds (where pip is
# configured with a CPU build, that one).
lock: venv
	$(LOCK) -o requirements/base.txt requirements/base.in
	env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null \
	  $(LOCK) -o requirements/ml.txt requirements/ml.in
	$(LOCK) -o requirements/dev.txt requirements/dev.in

# devtools.run restarts a process that dies (supervisord, devtools/supervisord.conf); other
# terminals find the platform through .run/env, which devtools.localservices writes.
run: venv
	$(PY) -m devtools.localservices run -- $(PY) -m devtools.run

test: venv
	@devtools/ensure-chromium
	$(PY) -m devtools.localservices test $(SERVICES_ARGS) -- $(PY) -m pytest $(PYTEST_ARGS)

# The reviewed OpenAPI contract, regenerated after an intended API change (commit it).
schema: venv
	$(PY) -m devtools.localservices test $(SERVICES_ARGS) -- env UPDATE_SCHEMA_SNAPSHOT=1 \
	  $(PY) -m pytest -q -p no:cacheprovider tests/test_schema_snapshot.py

# Its own run dir (and env file: .run/bench/env), so it works on its own data while
# `make run` is up and leaves that platform's .run/env alone.
bench: venv
	$(PY) -m devtools.localservices run --run-dir .run/bench -- $(PY) bench/replay_throughput.py $(BENCH_ARGS)

# The detectors and the default rule replayed in one process (no database reads; the
# settings still want the services' URLs, so the same run dir as bench provides them).
bench-alerts: venv
	$(PY) -m devtools.localservices run --run-dir .run/bench -- $(PY) bench/alert_detection.py $(BENCH_ARGS)

# The database must be built first, once: bench/api_data.py build (see its docstring);
# a run appends to bench/results/api_load_runs.jsonl, the report takes the medians.
bench-api: venv
	$(PY) bench/api_load.py run $(BENCH_ARGS)
	$(PY) bench/api_load.py report

# Its own run dir and, always, its own embedded PostgreSQL and Redis (the variables that
# would name other servers are unset): it kills them. The run dir's servers start empty,
# so that one run's leftovers (a backlog a failed run left) never weigh on the next.
chaos: venv
	rm -rf .run/chaos/pgdata .run/chaos/redis
	env -u DATABASE_URL -u REDIS_URL $(PY) -m devtools.localservices run --run-dir .run/chaos -- \
	  $(PY) bench/chaos.py $(CHAOS_ARGS)

# ruff, mypy, lint-imports and pip-audit come with the development lock (requirements/dev.in).
# The audit fails on a known vulnerability; a package it cannot look up (no network to its
# vulnerability service) is reported as not checked, not as a failure.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(PY) -m devtools.localservices test $(SERVICES_ARGS) -- $(VENV)/bin/mypy .
	$(PY) -m devtools.audit_deps
