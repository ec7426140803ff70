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

.PHONY: install test demo base-demo study bench clean

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

# The paper's analysis on this machine: 12 operators on the small preset (4 -> 6 layers: starts
# 0, 1, 2 x blocks 1, 2 x duplicate/random, both "on top" baselines included), LAG@20 with every
# step validated for the first 20 steps, then every candidate continued to step 220 (study mode),
# then tools/analyze_lag.py. About 30 minutes on 2 cores; the report is runs/lag_study/analysis.
STUDY_DIR ?= runs/lag_study
study: $(STAMP)
	OUT_DIR=$(STUDY_DIR) STUDY=1 BASE_STEPS=150 GROW_LAYERS=2 SPACE="starts0=0,1,2;blocks=1,2;inits=duplicate,random" \
	LAG_STEPS=20 DENSE_EVAL_STEPS=20 EVAL_INTERVAL=10 TOTAL_STEPS=220 PYTHON=$(PY) launch_scripts/ul2_grow.sh
	$(PY) tools/analyze_lag.py $(STUDY_DIR) --replay "lag:k=60" --replay "sh:eta=2,r0=5,k=20"
	$(PY) benchmarks/lag_cost.py $(STUDY_DIR) > $(STUDY_DIR)/analysis/cost.json
	@echo "report: $(STUDY_DIR)/analysis/report.md"

base-demo: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m lag_ds.train --config launch_scripts/configs/small_base.yaml

# Every benchmark script, each printing JSON into $(BENCH_DIR) (benchmarks/README.md has the latest
# figures). QUICK=1: sizes for a CI-sized machine (tiny/quick models, a few minutes in all).
BENCH_DIR ?= runs/bench
bench: $(STAMP)
	mkdir -p $(BENCH_DIR)
	$(PY) benchmarks/ul2_vs_causal_throughput.py $(if $(QUICK),--preset tiny --steps 5,--preset small --steps 20) \
	    > $(BENCH_DIR)/ul2_vs_causal_throughput.json
	$(PY) benchmarks/grow_checkpoint_benchmark.py --workdir $(BENCH_DIR)/grow \
	    $(if $(QUICK),--hidden 512 --ffn 1280 --heads 8,) > $(BENCH_DIR)/grow_checkpoint.json
	rm -rf $(BENCH_DIR)/startup
	$(PY) benchmarks/job_startup.py --workdir $(BENCH_DIR)/startup $(if $(QUICK),--quick,) \
	    > $(BENCH_DIR)/job_startup.json
	$(PY) benchmarks/race_efficiency.py $(BENCH_DIR)/startup/race > $(BENCH_DIR)/race_efficiency.json
	if [ -d $(STUDY_DIR) ]; then $(PY) benchmarks/lag_cost.py $(STUDY_DIR) > $(BENCH_DIR)/lag_cost.json; \
	else echo "lag_cost.py skipped: no $(STUDY_DIR) (run make study first)"; fi
	@echo "results: $(BENCH_DIR)/*.json"

clean:
	rm -rf runs .cache
