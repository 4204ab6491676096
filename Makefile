# repomem: `make run` opens the app on REPO (default: this repository); `make test` runs the tests.
# Both create .venv, build the C extension, fetch and verify the models, and reuse all of it next time.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
REPO   ?= $(CURDIR)
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup run test lint clean

NEED_PY := import sys; sys.exit(sys.version_info < (3, 11))

# bin/pip, not bin/python: venv writes python before ensurepip, which fails without python3-venv. A failed
# venv is removed, so the next try starts clean.
$(BIN)/pip:
	@$(PYTHON) -c '$(NEED_PY)' || { echo "repomem needs Python >= 3.11; $(PYTHON) is $$($(PYTHON) -V 2>&1): run make PYTHON=python3.12 (or another)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); exit 1; }
	$(BIN)/pip install -q --upgrade pip || { rm -rf $(VENV); exit 1; }

$(STAMP): pyproject.toml setup.py $(wildcard native/*.c native/*.h) | $(BIN)/pip
	@$(BIN)/python -c '$(NEED_PY)' || { echo "$(VENV) has $$($(BIN)/python -V 2>&1); repomem needs >= 3.11: make clean, then make PYTHON=python3.12 (or another)" >&2; exit 1; }
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

lint: $(STAMP)
	$(BIN)/ruff check core app native bench tests

clean:
	rm -rf $(VENV) build *.egg-info native/*.so
