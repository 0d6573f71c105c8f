# The README's two commands, and the full test tier. Each creates .venv if it is missing and (re)installs when
# pyproject changes.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# DVC runs each stage's `python` from PATH: make it the project's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: run test test-all test-full lint install

run: $(STAMP)
	@test -d data/raw || transfer sample digits data/raw
	dvc repro
	@echo && cat reports/summary.txt

# The default tier: a fast test for every promise, in about 3 minutes on 2 cores.
test: $(STAMP)
	pytest

# Both tiers: the default one, then the full one (real dvc repro, Ray clusters, torchrun ranks, real datasets).
test-all: test test-full

test-full: $(STAMP)
	pytest -m "(integration or slow) and not gpu"

lint: $(STAMP)
	ruff check . && ruff format --check .

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)
