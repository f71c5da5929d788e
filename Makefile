# The two commands of the README. Each one does its own set-up: a virtualenv in .venv with the
# local CPU build of torch (never a CUDA download), then qwenkit with the extras it needs.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: setup demo test test-slow test-all lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[dev,serve,eval,plot]"
	touch $@

setup: $(VENV)/.installed

# The main job: the five applications on the default model, then a short LoRA fine-tune.
demo: setup
	$(VENV)/bin/qwenkit demo

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

# The code's own checks: ruff (lint and format) and the import layering (pyproject.toml).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow"

clean:
	rm -rf $(VENV) runs
