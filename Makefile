# The two commands: `make demo` (set up + run the whole pipeline on the built-in demo
# data, offline) and `make test` (set up + run the tests). Both create .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export TF_CPP_MIN_LOG_LEVEL ?= 3
export NO_MKDOCS_2_WARNING := 1

.PHONY: install browser demo test test-fast test-integration test-e2e lint compile docs docs-serve lock clean

# Exact versions from the lock file (the same one the Docker image uses), then mltag itself.
$(VENV)/.installed: pyproject.toml requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

install: $(VENV)/.installed

# The browser tests drive Debian's Chromium (Playwright's own browser download cannot be reached). Only the
# tests need it, so `make demo` does not wait for it.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		apt-get install -y -qq chromium >/dev/null; } || echo "make: chromium is missing: apt-get install chromium (the browser tests need it)"

demo: install
	dvc repro -q
	mltag metrics
	mltag predict data/demo/images/00001.jpg data/demo/images/00002.jpg data/demo/images/00003.jpg

# Every tier in one pytest command: unit (seconds, no processes), integration (steps in process), e2e (dvc,
# mlflow server, kfp.local, kill -9), two workers, a test file per worker at a time. Every test is independent of
# order, with its own project. A step is one plain process (no helper process, no fork), so workers do not hang.
test: install browser
	$(BIN)/ruff check src components pipeline tests benchmarks
	$(BIN)/hadolint Dockerfile
	$(BIN)/mkdocs build --strict --quiet
	$(BIN)/pytest -q -ra -n 2 --dist loadfile --no-loadscope-reorder tests

# The unit tier alone: under a minute.
test-fast: install
	$(BIN)/pytest -q tests/unit

test-integration: install
	$(BIN)/pytest -q tests/integration

test-e2e: install browser
	$(BIN)/pytest -q tests/e2e

lint: install
	$(BIN)/ruff check src components pipeline tests benchmarks
	$(BIN)/hadolint Dockerfile

compile: install
	mltag pipeline compile

# The docs site (docs/, MkDocs Material) with its generated parts: params.yaml's JSON Schema and the
# parameter reference in docs/configuration.md (tests check both). --strict: a broken link fails.
docs: install
	mltag params schema > docs/params.schema.json
	mltag params reference --write docs/configuration.md
	$(BIN)/mkdocs build --strict

docs-serve: install
	$(BIN)/mkdocs serve --dev-addr 127.0.0.1:8000

# Re-resolve the lock files after changing pyproject.toml (needs network access to PyPI).
lock: install
	$(BIN)/pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml --extra kubeflow --extra dvc --python-version 3.11 \
		--python-platform x86_64-unknown-linux-gnu --no-header --annotation-style line -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 \
		--python-platform x86_64-unknown-linux-gnu --no-header --annotation-style line -o requirements-dev.lock

clean:
	rm -rf data models reports metrics plots mlflow.db mlruns mlartifacts .mltag-cache site
