# `make demo` and `make test` create the venv when it is missing.
PY ?= python3
VENV ?= .venv
DATA ?= $(abspath ../shared/data)
export DLSWEEP_DATA_DIR ?= $(DATA)

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/dlsweep run sweeps/mnist_labels_100.yaml --smoke
	$(VENV)/bin/dlsweep report sweeps/mnist_labels_100.yaml --smoke

test: install
	$(VENV)/bin/python -m pytest -q

bench: install
	$(VENV)/bin/python bench/bench_core.py

.PHONY: install demo test bench
