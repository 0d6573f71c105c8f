# The README's two commands, and the full test tier. Each creates .venv if it is missing and (re)installs when
# pyproject changes: `make run` the runtime dependencies only, the test targets the dev extra too (pytest, ruff, Ray).
PYTHON ?= python3
VENV := .venv
RUNTIME := $(VENV)/.installed-runtime
DEV := $(VENV)/.installed-dev
# DVC runs each stage's `python` from PATH: make it the project's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: run test test-all test-full lint install

# `make run DATA=~/photos` puts your ImageFolder at data/raw (transfer init: versioned by dvc add); plain `make run`
# writes the bundled sample there when data/raw is missing, versioned the same way (data/raw.dvc is committed).
run: $(RUNTIME)
ifdef DATA
	transfer init "$(DATA)"
endif
	@test -e data/raw || { transfer sample digits data/raw && dvc add --quiet data/raw; }
	dvc repro
	@echo && cat reports/summary.txt

# The default tier: a fast test for every promise, in about 3 minutes on 2 cores.
test: $(DEV)
	pytest

# Both tiers: the default one, then the full one (real dvc repro, Ray clusters, torchrun ranks, real datasets).
test-all: test test-full

test-full: $(DEV)
	pytest -m "(integration or slow) and not gpu"

lint: $(DEV)
	ruff check . && ruff format --check .

install: $(RUNTIME)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip

$(RUNTIME): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install --quiet -e .
	touch $@

# The dev extra holds the runtime dependencies too: its install brings both stamps up to date.
$(DEV): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $@ $(RUNTIME)
