# The torch build to install first: torchvision's compiled ops must match it exactly.
TORCH_VERSION ?= 2.14.1
TORCHVISION_VERSION ?= 0.29.1
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test lint format demo bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# setup.py builds the native top-K (src/convnn/_rank.c) into the source tree
$(VENV)/.installed: $(BIN)/python pyproject.toml setup.py src/convnn/_rank.c
	$(BIN)/pip install -q "torch==$(TORCH_VERSION)" "torchvision==$(TORCHVISION_VERSION)"
	$(BIN)/pip install -q -e ".[test,triton]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/ruff check src tests benchmarks

format: install
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

test: install lint
	$(BIN)/python -m pytest

demo: install
	$(BIN)/convnn demo

bench: install
	$(BIN)/convnn bench --out benchmarks/results.json

clean:
	rm -rf $(VENV) runs .pytest_cache build
	find src -name '*.so' -delete
