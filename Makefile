# Two commands (README): `make demo`, `make test`. Both create .venv on a fresh machine.
# Without a usable CUDA torch on the machine, the venv takes torch's CPU build (torch==2.13.0);
# with one, the venv sees the torch the user has (--system-site-packages) and installs no torch.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check
HAS_CUDA_TORCH := $(shell $(PYTHON) -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1 && echo 1)

.PHONY: demo test test-gpu bench lib clean

$(VENV)/.base:
	@if [ "$(HAS_CUDA_TORCH)" = "1" ]; then $(PYTHON) -m venv --system-site-packages $(VENV); \
	 else $(PYTHON) -m venv $(VENV) && $(PIP) "torch==2.13.0"; fi
	@touch $@

$(VENV)/.demo: $(VENV)/.base pyproject.toml setup.py
	$(PIP) -e ".[triton,hf]"
	@touch $@

$(VENV)/.test: $(VENV)/.base pyproject.toml setup.py
	$(PIP) -e ".[test]"
	@touch $@ $(VENV)/.demo

demo: $(VENV)/.demo
	$(PY) -m h3moe.demo

test: $(VENV)/.test
	$(PY) -m pytest -q tests bench/test_bench_smoke.py

test-gpu: $(VENV)/.test
	$(PY) -m pytest -q -m gpu tests

bench: $(VENV)/.test
	$(PY) -m bench

lib:
	cmake -S . -B build/csrc -DCMAKE_BUILD_TYPE=Release && cmake --build build/csrc -j

clean:
	rm -rf build $(VENV) h3moe/lib *.egg-info
