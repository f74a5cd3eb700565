# The README's two commands. Both create .venv, install torch==2.13.0 first (a pinned CPU build; an
# unpinned torch would pull several GB of CUDA packages), then the project.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
TORCH  := torch==2.13.0

.PHONY: demo test install install-test bench clean

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH)
	$(PIP) install -e '.[cli]'
	touch $@

$(VENV)/.test: $(VENV)/.core
	$(PIP) install -e '.[cli,test]'
	touch $@

install: $(VENV)/.core

install-test: $(VENV)/.test

demo: $(VENV)/.core
	$(VENV)/bin/alignkit demo

test: $(VENV)/.test
	$(PY) -m pytest -n 2 -q tests

bench: $(VENV)/.test
	$(PY) bench/run_cpu.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
