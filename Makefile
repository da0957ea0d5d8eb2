# One entry point for people, CI and containers alike.
#   make setup   create .venv and install everything (torch first, CPU build)
#   make test    setup + ruff + the whole test suite (what .ci/run runs)
#   make run     setup + the demo: both services, real images, a trained model (Ctrl-C stops)
#   make serve   setup + both services, nothing else (dinocluster serve)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch must be installed before anything that depends on it, explicitly and
# pinned: resolved as a dependency, pip would fetch a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup test lint run serve clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

run: setup
	$(BIN)/dinocluster demo $(DEMO_ARGS)

serve: setup
	$(BIN)/dinocluster serve

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
