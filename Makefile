# Two commands on a fresh machine:  `make demo`  then  `make test`.
# Everything installs into .venv from the registries, pinned by constraints.txt; torch is the
# CPU build 2.13.0 (a plain `torch` requirement could pull a multi-GB CUDA build).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_DATA ?= data/demo

.PHONY: setup demo test test-fast lint clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

$(DEMO_DATA)/manifest.json: | $(STAMP)
	$(BIN)/python -m data_prep.synthetic --output $(DEMO_DATA)

# Set up, write the synthetic default dataset, train it with DeepSpeed (2 ranks), test the best
# model, then write the intent report of the new model (runs/demo/intents/report.md and plots).
demo: $(STAMP) $(DEMO_DATA)/manifest.json
	PATH=$(abspath $(BIN)):$$PATH deepspeed --num_gpus 2 launcher/train.py --config configs/demo.yaml --data $(DEMO_DATA)
	rm -rf runs/demo/intents
	$(BIN)/python -m launcher.intents runs/demo --data $(DEMO_DATA) --output runs/demo/intents

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not distributed"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

clean-demo:
	rm -rf $(DEMO_DATA) runs/demo
