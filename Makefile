# Two commands: `make demo` and `make test`. Each creates .venv when missing and installs once;
# a second run finds the stamp file up to date and skips installation.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TORCH  := torch==2.13.0

.PHONY: demo test lint typecheck pytest bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch first, pinned, so that no later resolver step pulls a multi-GB CUDA build.
$(VENV)/.torch: | $(PY)
	$(PIP) install --quiet $(TORCH)
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.torch
	$(PIP) install --quiet -e ".[dev]"
	touch $@

$(VENV)/.demo: pyproject.toml $(VENV)/.torch
	$(PIP) install --quiet -e ".[demo]"
	touch $@

demo: $(VENV)/.demo
	$(PY) -m megatron_core.demo

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check megatron_core specs tests examples bench

typecheck: $(VENV)/.dev
	$(VENV)/bin/mypy megatron_core specs

pytest: $(VENV)/.dev
	$(VENV)/bin/pytest -q -rs

test: lint typecheck pytest

bench: $(VENV)/.dev
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache demo_out runs
