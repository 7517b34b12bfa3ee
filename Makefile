# Two-command quickstart: `make demo` and `make test`. Both create or update ./.venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install bytecode test test-fast test-faults lint demo reproduce bench clean

install: $(STAMP)

# The install compiles every file's bytecode (`--compile-bytecode`): keep it. These machines set
# PYTHONDONTWRITEBYTECODE=1, so without it every process compiled torch, Ray and the rest from source on each import
# (the suite took 37 min). uv resolves and installs the ~150 packages in about 40 s where pip took 100 s (pip itself
# only installs uv). uv reads no pip config: pip's find-links (where this kind of machine keeps its torch file) is
# handed on when set. matplotlib builds its font cache on first import and says so ("generated new fontManager"):
# built here once, not in the first job (or Ray worker) that draws a figure.
$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "uv>=0.5"
	$(if $(PIP_FIND_LINKS),UV_FIND_LINKS="$(PIP_FIND_LINKS)") $(BIN)/uv pip install --quiet --python $(BIN)/python \
		--compile-bytecode -c requirements/constraints.txt -e ".[dev]"
	$(BIN)/python -c "import matplotlib.font_manager"
	touch $(STAMP)

# The project's own modules are installed editable, so pip compiled none of them, and with PYTHONDONTWRITEBYTECODE=1
# every Ray worker process compiled them again from source on import (half a second of CPU each; hundreds of
# processes in the test suite). Compiled here, for changed files only.
PACKAGES := model pipelines workloads conf cluster
bytecode: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m compileall -q $(PACKAGES)

lint: $(STAMP)
	$(BIN)/ruff check .

# The unit tier (tests/unit: no Ray, no S3) runs in seconds; `make test` adds the integration tier (real Ray, S3, jobs).
test-fast: lint bytecode
	$(BIN)/python -m pytest -q tests/unit

test: lint bytecode
	$(BIN)/python -m pytest -q -m "not faults" --durations=15 tests/unit tests/integration

# The fault tests (marked `faults`: a killed, preempted or stalled process, a full disk, a repeated out-of-memory),
# too long together for the integration tier's budget; CI runs them after `make test`.
test-faults: bytecode
	$(BIN)/python -m pytest -q -m faults --durations=15 tests/integration

# `make demo storage=s3://bucket/prefix` keeps data, runs and the sweep in object storage; ARGS='...' passes any
# other override of conf/demo.py (e.g. ARGS='train.steps=500 depths=[1,2,3,4]').
demo: bytecode
	$(BIN)/python -m workloads.demo $(if $(storage),storage=$(storage)) $(ARGS)

# `make reproduce` runs the paper's studies on the shapes data and writes reproduce/report.md (the default preset,
# about 90 minutes on 2 cores before the autoencoder finding, which adds an estimated 20-25); `make reproduce
# preset=quick` checks the machinery in minutes; ARGS='...' overrides.
reproduce: bytecode
	$(BIN)/python -m workloads.reproduce $(if $(preset),preset=$(preset)) $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m workloads.bench.model

clean:
	rm -rf $(VENV) outputs demo_output reproduce .pytest_cache .ruff_cache
