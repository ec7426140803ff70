# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create/reuse .venv and install lag_ds into it. Without CUDA, torch is installed first from
# TORCH_SPEC (the CPU build; set TORCH_PIP_ARGS, e.g. an extra index, on machines where the plain
# spec would resolve to a CUDA wheel), so the later `pip install -e .` never pulls CUDA packages.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lag_ds-installed
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install test demo base-demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	    $(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch; \
	else \
	    $(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -c "import torch, deepspeed, megatron.core; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# The demo is the user's main job with its embedded CPU default: base pretraining of the small
# preset, 8 growth candidates raced 2 at a time, LAG@40, the winner promoted (launch_scripts/ul2_grow.sh).
demo: $(STAMP)
	PYTHON=$(PY) launch_scripts/ul2_grow.sh

base-demo: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m lag_ds.train --config launch_scripts/configs/small_base.yaml

bench: $(STAMP)
	$(PY) benchmarks/ul2_vs_causal_throughput.py

clean:
	rm -rf runs .cache
