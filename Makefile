# The two commands of the README. Each one does its own set-up: a virtualenv in .venv with the
# local CPU build of torch (never a CUDA download), then qwenkit with the extras it needs.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: setup demo test test-slow test-all clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[dev,serve,eval,plot]"
	touch $@

setup: $(VENV)/.installed

# The main job: a random-init Qwen2.5 checkpoint, then generation from it.
demo: setup
	$(VENV)/bin/qwenkit new --preset qwen2.5-0.5b --layers 2 --seed 0 --out runs/demo-model
	$(VENV)/bin/qwenkit generate --model runs/demo-model --prompt "The capital of France is" --max-new-tokens 16

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow"

clean:
	rm -rf $(VENV) runs
