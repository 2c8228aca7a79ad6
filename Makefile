# Two entry points: `make demo` (the main job, end to end, offline) and `make test`.
# Both create .venv and install what they need. For a CUDA build of torch:
#   make test TORCH="torch==2.13.0 --index-url <your CUDA wheel index>"
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint pytest bench clean

# pip installs without compiling, then compileall compiles everything on every core (pip compiles on one);
# the bytecode is still all there up front, for users who set PYTHONDONTWRITEBYTECODE too
PIP := $(BIN)/python -m pip install -q --no-compile
COMPILE := $(BIN)/python -m compileall -qq -j 0 $(VENV)/lib > /dev/null || true  # a file that does not compile is skipped, as pip does

# the demo needs the eval and toy extras; the tests also the dev tools
$(BIN)/.installed-demo: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH)
	$(PIP) -e ".[eval,toy]"
	$(COMPILE)
	touch $@

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH)
	$(PIP) -e ".[dev,eval,toy]"
	$(COMPILE)
	touch $@ $(BIN)/.installed-demo

demo: $(BIN)/.installed-demo
	$(BIN)/python scripts/demo.py

lint: $(BIN)/.installed
	$(BIN)/ruff check rvhub tests scripts
	$(BIN)/mypy

pytest: $(BIN)/.installed
	$(BIN)/python -m pytest -q

test: lint pytest

bench: $(BIN)/.installed
	$(BIN)/python scripts/bench_extract_apply.py

clean:
	rm -rf $(VENV) demo-out
