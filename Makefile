# The everyday commands; README.md and .ci/run use exactly these.
PYTHON ?= python

.PHONY: install test lint bench

install:  ## the package in editable mode, with the test extra
	$(PYTHON) -m pip install -e '.[test]'

test: install  ## the whole suite (fast: tiny models built in temporary folders)
	$(PYTHON) -m pytest

lint:
	$(PYTHON) -m ruff check .

bench:  ## every benchmark script under tests/bench/, one after the other (figures, not assertions)
	@set -e; for script in tests/bench/*.py; do echo "== $$script"; $(PYTHON) $$script; done
