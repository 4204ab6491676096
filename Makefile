# repomem: `make run` opens the app on REPO (default: this repository); `make test` runs the tests.
# Both create .venv, build the C extension, fetch and verify the models, and reuse all of it next time.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
REPO   ?= $(CURDIR)
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup run test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml setup.py $(wildcard native/*.c native/*.h) | $(BIN)/python
	$(BIN)/pip install -e '.[test]'
	touch $@

# Always asked: a verified model is recognised in milliseconds (size + remembered sha256).
setup: $(STAMP)
	$(BIN)/repomem models fetch qwen2.5-coder-0.5b
	$(BIN)/repomem models fetch smollm2-135m

run: setup
	$(BIN)/repomem gui "$(REPO)"

test: setup
	$(BIN)/python -m pytest -q -ra

lint: setup
	$(BIN)/ruff check core app native bench tests

clean:
	rm -rf $(VENV) build *.egg-info native/*.so
