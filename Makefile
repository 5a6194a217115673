# avatarflow — every target creates .venv on first use.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# This machine's pip config names local wheel folders that may be absent; hide those warnings.
QUIET := 2>&1 | { grep -v 'is ignored: it is neither' || true; }

.PHONY: demo test test-fast lint typecheck fmt bench schema clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip $(QUIET)
	$(BIN)/pip install --quiet -e '.[test]' $(QUIET)
	touch $(STAMP)

# The random-weight tiny checkpoint renders noise in the shape of a real render: named explicitly.
demo: $(STAMP)
	$(BIN)/avatarflow run manifests/examples/demo.parquet --backend local --model-dir tiny --target ./out

# The whole suite (slow scenarios included), on every core; what CI runs.
test: $(STAMP)
	RUN_SLOW=1 $(BIN)/python -m pytest -q -n auto --dist worksteal

# The inner loop: everything but the tests marked slow.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n auto

lint: $(STAMP) typecheck
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# The folders install as avatarflow.flows/.tasks/.model (pyproject's package-dir): mypy reads
# them through links with those names.
typecheck: $(STAMP)
	mkdir -p build/typecheck/avatarflow
	for p in flows tasks model; do ln -sfn ../../../$$p build/typecheck/avatarflow/$$p; done
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python bench/fal_throughput.py && $(BIN)/python bench/concat_speed.py

schema: $(STAMP)
	$(BIN)/python -m avatarflow.tasks.manifest --write-schema manifests/schema.json --write-sidecar-schema manifests/sidecar.schema.json

clean:
	rm -rf $(VENV) out .pytest_cache
