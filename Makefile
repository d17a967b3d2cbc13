# ctscan — every target CI and the README use. `make help` lists them.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch is installed first, pinned, so pip takes the local wheels instead of downloading a CUDA build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= dev,serve,export,dicom
# A local copy of the DVC remote (set to empty to pull from the gs:// remote in .dvc/config).
DVC_MIRROR ?= $(abspath $(wildcard ../shared/dvc-store))
SETTINGS ?=
SETTINGS_ARGS := $(foreach s,$(SETTINGS),--settings $(s))
RUN_DIR ?= outputs/runs/main-$(shell date +%Y%m%d-%H%M%S)
PYTEST_ARGS ?=

.PHONY: help install data preprocess audit train evaluate main test test-unit test-integration \
        lint format docker-lint bench clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

install: .make/installed ## Install ctscan with its extras (quick when nothing changed)

.make/installed: pyproject.toml
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[$(EXTRAS)]"
	@mkdir -p .make && touch $@

data: ## Pull the raw images with DVC (into data/)
	@if [ -n "$(DVC_MIRROR)" ]; then \
	  echo "dvc: using the local mirror $(DVC_MIRROR) for remote 'gcs' (.dvc/config.local)"; \
	  dvc remote modify --local gcs url "$(DVC_MIRROR)"; fi
	dvc pull -q

preprocess: ## Audit the raw images and write the processed store
	ctscan preprocess $(SETTINGS_ARGS)

audit: ## Print the audit of the raw images
	ctscan audit $(SETTINGS_ARGS)

train: ## Train with the default settings (evaluates the best checkpoint on test)
	ctscan train $(SETTINGS_ARGS) --out $(RUN_DIR) --quiet

evaluate: ## Evaluate a checkpoint: make evaluate CKPT=outputs/runs/.../best.pt
	ctscan evaluate $(SETTINGS_ARGS) $(CKPT)

main: install data ## The main job: data -> preprocess -> train -> evaluate, default settings
	ctscan preprocess $(SETTINGS_ARGS) --quiet
	ctscan train $(SETTINGS_ARGS) --out $(RUN_DIR) --quiet
	ctscan evaluate $(SETTINGS_ARGS) $(RUN_DIR)/best.pt

test: lint ## Lint, then the unit and real-data integration tests
	$(PYTHON) -m pytest $(PYTEST_ARGS)

test-unit: ## Unit tests only (fast, synthetic)
	$(PYTHON) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: ## Integration tests only (real data; run `make data` first)
	$(PYTHON) -m pytest tests/integration $(PYTEST_ARGS)

lint: ## ruff check + ruff format --check + hadolint on the Dockerfiles
	ruff check .
	ruff format --check .
	hadolint Dockerfile Dockerfile.cuda

format: ## Apply ruff's fixes and formatting
	ruff check --fix .
	ruff format .

docker-lint: ## Lint the Dockerfiles with hadolint
	hadolint Dockerfile Dockerfile.cuda

bench: ## Run the CPU benchmarks (writes bench/results/*.json; about 10 minutes)
	$(PYTHON) bench/cli_startup.py
	$(PYTHON) bench/preprocess_bench.py
	$(PYTHON) bench/train_bench.py --device cpu --epochs 2 --processed-dir outputs/processed224

clean: ## Remove the processed store and runs (outputs/); keeps data/
	rm -rf outputs .make
