# The two commands a new user needs (see README.md):
#   make demo   - set everything up and run the main demo
#   make test   - set everything up and run the tests
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast bench lint clean

setup:
	@bash scripts/bootstrap.sh

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

test-fast: setup
	UFFDIO_SKIP_SLOW=1 $(PY) -m pytest -q -ra -m "not slow" $(PYTEST_ARGS)

bench: setup
	@mkdir -p bench/results
	$(PY) -m uffdio bench faults --json > bench/results/faults.json
	@cat bench/results/faults.json

lint: setup
	$(PY) -m pip install -q mypy ruff
	$(PY) -m ruff check src tests examples
	$(PY) -m mypy

clean:
	rm -rf build $(VENV) src/*.egg-info src/uffdio/_native*.so src/uffdio/_native.c
