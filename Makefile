# The two commands of the README: `make demo` (the whole pipeline on the embedded tiny model) and
# `make test` (the test suite). Both create and reuse the local virtual environment .venv, installed
# from uv.lock: the exact versions CI tested, on every machine. uv resolves from the lock alone, so a
# pip configuration (a constraint file capping torch, extra indexes) does not change what is installed.
PYTHON ?= python3
UV_VERSION := 0.13.9
VENV := .venv
BIN := $(VENV)/bin
TOOLS := .venv-tools
UV := $(TOOLS)/bin/uv
STAMP := $(VENV)/.installed

.PHONY: demo demo-stream test test-all bench lint venv lock clean-demo browser

venv: $(STAMP)

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install -q uv==$(UV_VERSION)

# Reinstall when the lock changes. The reference extra (dictionary-learning, sae-lens) is installed too:
# the parity tests and `workbench verify` run those libraries in separate processes. So are both tracker
# extras: the tracker tests write real TensorBoard event files and offline wandb runs.
$(STAMP): pyproject.toml uv.lock $(UV)
	UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --locked --python $(PYTHON) --extra reference --extra tensorboard --extra wandb --extra dev
	touch $(STAMP)

# Refresh uv.lock after changing the dependencies in pyproject.toml (then `make test`, and commit both).
lock: $(UV)
	$(UV) lock --python $(PYTHON)

demo: $(STAMP)
	$(BIN)/workbench run recipes/demo.yaml

# The demo with the cache as a bounded buffer: collection and training at the same time in 16 shards of disk.
demo-stream: $(STAMP)
	$(BIN)/workbench run recipes/demo-stream.yaml

# The browser tests of the feature pages open them in headless Chromium, from Debian's package.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -m "not slow" -n 2 --dist loadfile --durations=25

test-all: $(STAMP) browser
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25

bench: $(STAMP)
	$(BIN)/python bench/collect_bench.py
	$(BIN)/python bench/reader_bench.py
	$(BIN)/python bench/train_bench.py
	$(BIN)/python bench/convert_bench.py
	$(BIN)/python bench/features_bench.py

lint: $(STAMP)
	$(BIN)/ruff check workbench tests bench

clean-demo:
	rm -rf checkpoints/demo
