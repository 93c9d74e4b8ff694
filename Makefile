# The two commands of the README: `make demo` (the whole pipeline on the embedded tiny model) and
# `make test` (the test suite). Both create and reuse the local virtual environment .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all bench lint venv clean-demo

venv: $(STAMP)

# Reinstall when the dependency list changes. The reference extra (dictionary-learning, sae-lens) is
# installed too: the parity tests and `workbench verify` run those libraries in separate processes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[reference,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/workbench run recipes/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/collect_bench.py
	$(BIN)/python bench/reader_bench.py
	$(BIN)/python bench/train_bench.py
	$(BIN)/python bench/convert_bench.py

lint: $(STAMP)
	$(BIN)/ruff check workbench tests bench

clean-demo:
	rm -rf checkpoints/demo
