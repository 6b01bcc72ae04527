# The README's commands: `make setup` once, then `make demo` (or `make test`).
.DEFAULT_GOAL := help
SHELL := /bin/bash
VENV := .venv
ARGS ?=

.PHONY: help setup test test-fast lint format cluster-up cluster-down demo demo-down

help:
	@echo "make setup      install everything (Debian packages, Python env, control plane binaries)"
	@echo "make test       run every test that does not need a GPU   (make test ARGS='-k crd -x')"
	@echo "make test-fast  the unit and integration tiers only (no control plane, no chart)"
	@echo "make lint       ruff check and format check"
	@echo "make format     ruff format and autofix"
	@echo "make cluster-up / cluster-down   a local cluster with GPU nodes (hack/cluster)"
	@echo "make demo       the whole stack via its Helm chart serving paid jobs end to end (root)"
	@echo "make demo-down  remove the demo's cluster, chain and .demo/"

setup:
	hack/setup

$(VENV)/bin/python:
	@echo "No $(VENV): run 'make setup' first." >&2; exit 1

# pytest-xdist workers: tests/conftest.py's worker_group keeps each module, the control-plane
# tests and the node-agent tests on one worker each. Three on two cores: most tests wait on
# processes, not the CPU (the full suite: 656 s on two workers, 477 s on three). WORKERS=0:
# one process.
WORKERS ?= 3
PARALLEL = $(if $(filter 0,$(WORKERS)),,-n $(WORKERS) --dist loadgroup)

test: $(VENV)/bin/python
	$(VENV)/bin/pytest $(PARALLEL) $(ARGS)

test-fast: $(VENV)/bin/python
	$(VENV)/bin/pytest $(PARALLEL) -m "unit or integration" $(ARGS)

lint: $(VENV)/bin/python
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/bin/python
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

cluster-up:
	hack/cluster up

cluster-down:
	hack/cluster down

demo: $(VENV)/bin/python
	$(VENV)/bin/python -m kubepeer_dev.demo up

demo-down: $(VENV)/bin/python
	$(VENV)/bin/python -m kubepeer_dev.demo down
