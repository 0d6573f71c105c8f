# The README's two commands. Each creates .venv if it is missing and (re)installs when pyproject changes.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# DVC runs each stage's `python` from PATH: make it the project's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: run test install lint

run: $(STAMP)
	@test -d data/raw || transfer sample digits data/raw
	dvc repro
	@echo && cat reports/summary.txt

test: $(STAMP)
	pytest

lint: $(STAMP)
	ruff check . && ruff format --check .

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)
