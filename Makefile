# The README's two commands: `make demo` and `make test`. Both create .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GX_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-fast lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: pip then finds it satisfied instead of resolving a newer build
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/transfer-pipeline demo

# Two pytest workers: much of the suite waits on real servers and CLI processes, so a second
# worker fills the CPU the first leaves idle. Each worker gets its share of the CPUs for torch's
# threads (tests/conftest.py), or the two oversubscribe them. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	PREFECT_HOME=$(CURDIR)/.pytest_prefect $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal

test-fast: install
	PREFECT_HOME=$(CURDIR)/.pytest_prefect $(BIN)/python -m pytest -m "not slow" -n $(TEST_WORKERS) --dist worksteal

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# make bench DATA=path/to/hymenoptera_data (the PyTorch tutorial's ants/bees folder)
bench: install
	@test -n "$(DATA)" || { echo "usage: make bench DATA=path/to/hymenoptera_data"; exit 2; }
	$(BIN)/python benchmarks/flow_timings.py --data $(DATA) --json benchmarks/results/hymenoptera_flow.json
	$(BIN)/python benchmarks/vs_tutorial.py --data $(DATA) --json benchmarks/results/vs_tutorial.json

clean:
	rm -rf $(VENV) .pytest_cache .pytest_prefect transfer-runs
