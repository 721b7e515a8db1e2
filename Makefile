# The two commands a new user needs (see README.md):
#   make demo   - set everything up and run the main demo
#   make test   - set everything up and run the tests
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo demo-faults test test-fast bench lint clean

setup:
	@bash scripts/bootstrap.sh

demo: setup
	$(PY) examples/swap_demo.py

# the fault-handling demo of the foundation (coroutine and C resolver side by side)
demo-faults: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

test-fast: setup
	UFFDIO_SKIP_SLOW=1 $(PY) -m pytest -q -ra -m "not slow" $(PYTEST_ARGS)

# The standard benchmark set (about 5 minutes here); results in bench/results/.
bench: setup
	@mkdir -p bench/results
	$(PY) -m pip install -q 'matplotlib>=3.5'
	$(PY) -m uffdio bench swap --size 512M --limit 128M --store memory --runs 3 --json \
		--plot bench/results/swap-512M-128M.png > bench/results/swap-512M-128M.json
	$(PY) -m uffdio bench evict --size 256M --rounds 3 --sparse 8 --json > bench/results/evict-sparse8.json
	$(PY) -m uffdio bench evict --size 256M --rounds 3 --sparse 2 --json > bench/results/evict-sparse2.json
	$(PY) -m uffdio bench evict --size 256M --rounds 3 --sparse 8 --store file:/var/tmp --json > bench/results/evict-file.json
	$(PY) -m uffdio bench faults --json > bench/results/faults-same.json
	$(PY) -m uffdio bench faults --json --placement split > bench/results/faults-split.json
	$(PY) -m uffdio bench dirty --size 64M --fractions 0.01,0.1,1 --rounds 3 --json > bench/results/dirty-64M.json
	$(PY) scripts/bench-table.py bench/results

lint: setup
	$(PY) -m pip install -q mypy ruff
	$(PY) -m ruff check src tests examples
	$(PY) -m mypy

clean:
	rm -rf build $(VENV) src/*.egg-info src/uffdio/_native*.so src/uffdio/_native.c

# The C core under AddressSanitizer + UBSan, in a separate venv (non-editable install, so the
# normal build is untouched).  Runs the fast tests.
test-asan: setup
	test -x .venv-asan/bin/python || python3 -m venv .venv-asan
	UFFDIO_CFLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -g" \
		.venv-asan/bin/python -m pip install -q --force-reinstall --no-deps . && \
		.venv-asan/bin/python -m pip install -q '.[test]'
	cd tests && LD_PRELOAD=$$(gcc -print-file-name=libasan.so):$$(gcc -print-file-name=libubsan.so) \
		UFFDIO_ASAN=1 ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:handle_sigbus=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		UFFDIO_SKIP_SLOW=1 ../.venv-asan/bin/python -m pytest -q -p no:cacheprovider -m "not slow" \
		--rootdir=.. -c ../pyproject.toml .
