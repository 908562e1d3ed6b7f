# One entry point for people and CI. Every target does its own set-up (`make setup` is idempotent).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_ROWS ?= 20000
DEMO_ARGS ?=
PYTEST_ARGS ?=
# torch from the CPU wheel index: PyPI's Linux wheel pulls in CUDA (several GB of nvidia packages). Where
# that index cannot be reached (a machine with only PyPI), PyPI's wheel, with one line saying so.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_PIN := torch==2.13.0
define install_torch
	@$(BIN)/pip install --quiet --timeout 15 --retries 1 --index-url $(TORCH_INDEX) "$(TORCH_PIN)" >/dev/null 2>&1 \
		|| { echo "torch: $(TORCH_INDEX) not reachable, $(TORCH_PIN) from the default index"; \
		$(BIN)/pip install --quiet "$(TORCH_PIN)"; }
endef

.PHONY: test-faults setup lock test lint demo compile bench clean help torch

help:
	@echo "make setup    create $(VENV) and install the project (idempotent)"
	@echo "make demo     the whole life cycle on the embedded default, with an HTML report (< 10 min)"
	@echo "make test     lint + the whole test suite but the fault matrix"
	@echo "make test-faults  the fault-matrix scenarios (about 15 min)"
	@echo "make compile  write the KFP pipeline IR to build/training_pipeline.yaml"
	@echo "make bench    run the benchmarks (JSON on stdout)"
	@echo "make lock     re-pin requirements.lock to the venv (after changing pyproject.toml)"

setup: $(STAMP)

# Re-installs only when pyproject.toml or the lock changes. torch is installed first and pinned, so pip
# takes the CPU wheel instead of resolving a CUDA build through another package's requirement; every other
# dependency is pinned by requirements.lock, so a new upstream release cannot change a green build.
$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required (set PYTHON=...)")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(install_torch)
	$(BIN)/pip install --quiet -c requirements.lock -e ".[dev,cluster]"
	@touch $@

# Re-pin every dependency to what the venv has now (after a deliberate upgrade in pyproject.toml).
# The torch step of `make setup` alone (BIN=... points it at another environment).
torch:
	$(install_torch)

lock: setup
	@{ sed -n '1,3p' requirements.lock; $(BIN)/pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > requirements.lock.new
	@mv requirements.lock.new requirements.lock
	@echo "requirements.lock: $$(grep -c '==' requirements.lock) pins"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The fault matrix (about 15 min): not part of `make test`, whose CI run must stay under 40 min.
test-faults: setup
	$(BIN)/python -m pytest -m faults $(PYTEST_ARGS)

compile: setup
	$(BIN)/mlops pipeline compile --out build/training_pipeline.yaml

# The whole life cycle on the embedded default: stack up, champion, challenger rollout under traffic, a
# rollback, a summary and one HTML report; stops what it started (DEMO_ARGS=--keep-stack keeps it running).
demo: setup
	$(BIN)/mlops demo --rows $(DEMO_ROWS) $(DEMO_ARGS)

bench: setup
	$(BIN)/python benchmarks/training.py --rows 50000 --epochs 4
	$(BIN)/python benchmarks/serving.py --json --duration 6 --connections 4 --rounds 3
	$(BIN)/python benchmarks/rollout.py --rounds 3 --rollouts 100

clean:
	rm -rf build .pytest_cache .ruff_cache

# Cluster (kind) targets: up, down, run, scenario, status, cluster-dry-run. Included last so that `help`
# stays the default goal and the cluster targets can depend on the venv set-up above.
include infra/cluster.mk
