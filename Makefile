# The two commands: `make demo` (set up + run the whole pipeline on the built-in demo
# data, offline) and `make test` (set up + run the tests). Both create .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: install demo test test-fast lint compile clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	dvc repro
	mltag metrics
	mltag predict data/demo/images/00001.jpg data/demo/images/00002.jpg data/demo/images/00003.jpg

test: install
	$(BIN)/ruff check src components pipeline tests
	$(BIN)/hadolint Dockerfile
	$(BIN)/pytest -q -ra

test-fast: install
	$(BIN)/pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check src components pipeline tests
	$(BIN)/hadolint Dockerfile

compile: install
	mltag pipeline compile

clean:
	rm -rf data models reports metrics plots mlflow.db mlruns mlartifacts .mltag-cache
