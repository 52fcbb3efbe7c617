# The two commands of the README: `make demo` and `make test`. Both set up .venv on first use.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-fast lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -c 'import sys; assert sys.version_info[:2] == (3, 11), "lpcgma needs Python 3.11"'
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

## The main job on the embedded synthetic benchmark.
demo: $(STAMP)
	$(BIN)/python experiments/tune_synthetic.py

## Every test (fast and slow) — what CI runs.
test: $(STAMP)
	$(BIN)/python -m pytest -q

## The fast suite only (unit tests; a few minutes).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check lpcgma tests experiments benchmarks
	$(BIN)/mypy lpcgma

clean:
	rm -rf runs ray_results .pytest_cache .mypy_cache .ruff_cache
