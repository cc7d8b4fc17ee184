# Quick start: `make demo` (set up, then run the main job) and `make test` (set up, then the tests).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTHON ?= python3

.PHONY: demo test setup debs browser

demo: setup
	$(VENV)/bin/slimtorch quantize fmnist-cnn --preset W8A8 --out out/fmnist-cnn-W8A8 --overwrite
	$(VENV)/bin/slimtorch export out/fmnist-cnn-W8A8 --format onnx

test: setup browser
	$(PY) -m pytest -q

setup: debs $(STAMP)

debs:
	@bash scripts/ensure_debs.sh

browser:
	@bash scripts/ensure_debs.sh --browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,hf,export]'
	touch $(STAMP)
