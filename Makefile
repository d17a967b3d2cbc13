# ctscan — every target CI and the README use. `make help` lists them.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

# PYTHON is the base interpreter (3.11+) that creates the project's virtual environment $(VENV), with
# --system-site-packages so that a torch already installed there is reused, not downloaded again;
# every target then runs the venv's python. VENV= (empty) means no venv: install into and run $(PYTHON).
PYTHON ?= python3
VENV ?= .venv
ifeq ($(strip $(VENV)),)
PY := $(PYTHON)
VENV_CFG :=
INSTALLED := .make/installed
else
PY := $(VENV)/$(if $(filter Windows_NT,$(OS)),Scripts,bin)/python
VENV_CFG := $(VENV)/pyvenv.cfg
INSTALLED := $(VENV)/.ctscan-installed
endif
PIP := $(PY) -m pip
CTSCAN := $(PY) -m ctscan
DVC := $(PY) -m dvc
PRE_COMMIT := $(PY) -m pre_commit
# pre-commit on every tracked file and every new one git does not ignore (--all-files skips new ones).
PRE_COMMIT_RUN = git ls-files -z --cached --others --exclude-standard | xargs -0 $(PRE_COMMIT) run
# torch is installed first, pinned, so pip takes the local wheels instead of downloading a CUDA build;
# TORCH_INDEX names a wheel index for it (CI on Linux: https://download.pytorch.org/whl/cpu).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TORCH_INDEX ?=
EXTRAS ?= dev,serve,export,dicom,sweep,openvino
# Images: $(IMAGE):$(IMAGE_TAG) (CPU) and $(IMAGE):$(IMAGE_TAG)-cuda; PUSH=1 pushes them after the build.
IMAGE ?= ctscan
IMAGE_TAG ?= latest
PUSH ?=
IMAGE_REF = $(shell printf '%s' '$(IMAGE)' | tr '[:upper:]' '[:lower:]')
# A local copy of the DVC remote (set to empty to pull from the gs:// remote in .dvc/config).
DVC_MIRROR ?= $(abspath $(wildcard ../shared/dvc-store))
SETTINGS ?=
SETTINGS_ARGS := $(foreach s,$(SETTINGS),--settings $(s))
RUN_DIR ?= outputs/runs/main-$(shell date +%Y%m%d-%H%M%S)
# once: a ?= variable runs date again at each use (train and evaluate could name two folders)
RUN_DIR := $(RUN_DIR)
PYTEST_ARGS ?=
# Two pytest workers (pytest-xdist); a test file runs whole on one worker, so its module fixtures
# are built once. PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest $(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadfile)

.PHONY: help install data preprocess audit audit-summary train evaluate main test test-unit \
        test-integration lint format docker-lint docker docker-cpu docker-cuda bench clean browser \
        pre-commit-tool

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "Environment: PYTHON=$(PYTHON) creates $(if $(VENV),$(VENV),no venv) and every target runs $(PY)."
	@echo "  make install PYTHON=/usr/bin/python3   another base interpreter (3.11+) for the venv"
	@echo "  make install VENV=                     no venv: install into and run PYTHON itself"

install: $(INSTALLED) ## Create .venv from PYTHON, install ctscan with its extras into it (quick when done)

ifneq ($(VENV_CFG),)
$(VENV_CFG):
	$(PYTHON) -m venv --system-site-packages $(VENV)
endif

$(INSTALLED): pyproject.toml $(VENV_CFG)
	$(PIP) install -q $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e ".[$(EXTRAS)]"
	@mkdir -p $(@D) && touch $@

# `make test` runs it first. What it cannot install (no apt-get, no root or passwordless sudo, no
# network) it names, and the web-page test then skips saying why; under CI (CI set) that fails instead.
browser: $(INSTALLED) ## Chromium + playwright for the web-page test (apt-get; quick when present)
	@found="$${CTSCAN_CHROMIUM:-}"; \
	for b in chromium chromium-browser google-chrome; do \
	  [ -n "$$found" ] || found="$$(command -v $$b || true)"; done; \
	apt="env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium"; \
	sudo=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	if [ -n "$$found" ]; then echo "browser: $$found"; \
	elif ! command -v apt-get >/dev/null; then \
	  echo "browser: no apt-get: install Chromium, set CTSCAN_CHROMIUM (else the web-page test skips)"; \
	  [ -z "$(CI)" ]; \
	elif echo "browser: apt-get install chromium" && { $$sudo $$apt >/dev/null 2>&1 || \
	    { $$sudo apt-get update -q >/dev/null 2>&1 && $$sudo $$apt >/dev/null 2>&1; }; }; then :; \
	else echo "browser: apt-get install chromium failed (needs root or passwordless sudo, and the" \
	  "network): run it yourself or set CTSCAN_CHROMIUM (else the web-page test skips)"; \
	  [ -z "$(CI)" ]; fi
	@$(PY) -c "import playwright" 2>/dev/null || $(PIP) install -q "playwright>=1.40" || \
	  { echo "browser: pip install playwright failed (else the web-page test skips)"; [ -z "$(CI)" ]; }

data: $(INSTALLED) ## Pull the raw images with DVC (into data/)
	@if [ -n "$(DVC_MIRROR)" ]; then \
	  echo "dvc: using the local mirror $(DVC_MIRROR) for remote 'gcs' (.dvc/config.local)"; \
	  $(DVC) remote modify --local gcs url "$(DVC_MIRROR)"; fi
	$(DVC) pull -q

preprocess: $(INSTALLED) ## Audit the raw images and write the processed store
	$(CTSCAN) preprocess $(SETTINGS_ARGS)

audit: $(INSTALLED) ## Print the audit of the raw images
	$(CTSCAN) audit $(SETTINGS_ARGS)

# In GitHub Actions the Markdown goes to the job summary; elsewhere to stdout.
AUDIT_MD ?= $(or $(GITHUB_STEP_SUMMARY),/dev/stdout)
audit-summary: $(INSTALLED) ## The audit as Markdown (CI: appended to the job summary)
	@{ echo "## ctscan audit ($$(git rev-parse --short HEAD 2>/dev/null || echo 'no git'))"; echo; \
	  echo '```'; COLUMNS=110 $(CTSCAN) audit $(SETTINGS_ARGS); echo '```'; } >> "$(AUDIT_MD)"

train: $(INSTALLED) ## Train with the default settings (evaluates the best checkpoint on test)
	$(CTSCAN) train $(SETTINGS_ARGS) --out $(RUN_DIR) --quiet

evaluate: $(INSTALLED) ## Evaluate a checkpoint: make evaluate CKPT=outputs/runs/.../best.pt
	$(CTSCAN) evaluate $(SETTINGS_ARGS) $(CKPT)

main: install data ## The main job: data -> preprocess -> train -> evaluate, default settings
	$(CTSCAN) preprocess $(SETTINGS_ARGS) --quiet
	$(CTSCAN) train $(SETTINGS_ARGS) --out $(RUN_DIR) --quiet
	ln -sfn $(notdir $(RUN_DIR)) $(dir $(RUN_DIR))main-latest  # the docs' examples use this name
	$(CTSCAN) evaluate $(SETTINGS_ARGS) $(RUN_DIR)/best.pt

test: lint $(INSTALLED) browser ## Lint, Chromium (make browser), then the unit and real-data integration tests
	$(PYTEST) $(PYTEST_ARGS)

test-unit: $(INSTALLED) ## Unit tests only (fast, synthetic)
	$(PYTEST) tests/unit $(PYTEST_ARGS)

test-integration: $(INSTALLED) ## Integration tests only (real data; run `make data` first)
	$(PYTEST) tests/integration $(PYTEST_ARGS)

# lint and format need pre-commit only (it installs the pinned hook tools itself), not the project.
pre-commit-tool: $(VENV_CFG)
	@$(PY) -m pre_commit --version >/dev/null 2>&1 || $(PIP) install -q "pre-commit>=4"

lint: pre-commit-tool ## The checks of .pre-commit-config.yaml: ruff, ruff format, hadolint, workflows, hygiene
	$(PRE_COMMIT_RUN) $(if $(CI),--show-diff-on-failure) --files

format: pre-commit-tool ## Apply ruff's fixes and formatting (the ruff that make lint uses)
	-$(PRE_COMMIT_RUN) ruff-fix --hook-stage manual --files
	-$(PRE_COMMIT_RUN) ruff-format --files
	$(PRE_COMMIT_RUN) ruff --files

docker-lint: pre-commit-tool ## Lint the Dockerfiles with hadolint
	$(PRE_COMMIT) run hadolint --files Dockerfile Dockerfile.cuda

docker: docker-cpu docker-cuda ## Build both images (IMAGE=ctscan IMAGE_TAG=latest; PUSH=1 pushes)

docker-cpu: ## Build the CPU image $(IMAGE):$(IMAGE_TAG) from Dockerfile
	docker build -f Dockerfile -t $(IMAGE_REF):$(IMAGE_TAG) .
	$(if $(PUSH),docker push $(IMAGE_REF):$(IMAGE_TAG))

docker-cuda: ## Build the CUDA image $(IMAGE):$(IMAGE_TAG)-cuda from Dockerfile.cuda
	docker build -f Dockerfile.cuda -t $(IMAGE_REF):$(IMAGE_TAG)-cuda .
	$(if $(PUSH),docker push $(IMAGE_REF):$(IMAGE_TAG)-cuda)

bench: $(INSTALLED) ## Run the CPU benchmarks (writes bench/results/*.json; about 10 minutes)
	$(PY) bench/cli_startup.py
	$(PY) bench/preprocess_bench.py
	$(PY) bench/train_bench.py --device cpu --epochs 2 --processed-dir outputs/processed224

clean: ## Remove the processed store and runs (outputs/); keeps data/ and .venv
	rm -rf outputs .make
