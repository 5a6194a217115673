# avatarflow — every target creates .venv on first use.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# This machine's pip config names local wheel folders that may be absent; hide those warnings.
QUIET := 2>&1 | { grep -v 'is ignored: it is neither' || true; }

.PHONY: demo test test-slow lint fmt bench schema clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip $(QUIET)
	$(BIN)/pip install --quiet -e '.[test]' $(QUIET)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/avatarflow run manifests/examples/demo.parquet --backend local --target ./out

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	RUN_SLOW=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

fmt: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python bench/fal_throughput.py && $(BIN)/python bench/concat_speed.py

schema: $(STAMP)
	$(BIN)/python -m tasks.manifest --write-schema manifests/schema.json

clean:
	rm -rf $(VENV) out .pytest_cache
