# One command sets everything up and runs the main job; one runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pip on this kind of machine may be capped to local torch wheels; a plain range works everywhere.
STAMP := $(VENV)/.installed

.PHONY: demo test reliability setup clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/prolip demo

# Gates first (lint, format, types: configured in pyproject.toml), then the suite.
test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile

# The reliability suite alone, with its tally (inputs tried, faults injected, handled, data lost).
reliability: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python tests/reliability/tally.py

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
