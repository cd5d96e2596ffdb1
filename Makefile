# poolkeeper developer entry points. Every target that needs Python uses .venv/.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= .demo
DEMO_SECONDS ?= 0
PYTEST_ARGS ?=

NODE ?=
AWS ?=

.PHONY: all venv binaries image test test-unit test-integration lint duplicates demo demo-down bench clean

# Check the machine first (and install from Debian's packages as root), so a fresh machine stops
# at once with what is missing instead of ten minutes into a build. Standard library only.
need-%:
	@PYTHONPATH=devtools $(PYTHON) -m poolkeeper_dev.requirements $*

all: test

$(BIN)/poolkeeper: pyproject.toml devtools/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]' -e devtools
	@touch $@

venv: $(BIN)/poolkeeper

# kube-apiserver, kube-controller-manager, kubectl and etcd, built from devcluster/ (cached).
binaries: need-control-plane venv
	$(BIN)/poolkeeper devcluster build

# poolkeeper, pause and testweb images as OCI archives in .images/, built without a registry or an
# engine (mmdebstrap, gcc); IMAGE_LOAD=<containerd socket> also imports them into its k8s.io namespace.
DEVCLUSTER_DIR ?= .devcluster

# Builds the images; loads them into $(DEVCLUSTER_DIR)'s node when one runs (and into IMAGE_LOAD if set).
image: need-image venv
	$(BIN)/python -m poolkeeper_dev.image build --devcluster $(DEVCLUSTER_DIR) $(if $(IMAGE_LOAD),--load $(IMAGE_LOAD),)

test: need-test venv binaries
	$(BIN)/pytest -q $(PYTEST_ARGS) tests

test-unit: venv
	$(BIN)/pytest -q $(PYTEST_ARGS) tests/unit

test-integration: need-test venv binaries
	$(BIN)/pytest -q $(PYTEST_ARGS) tests/integration

lint: venv
	$(BIN)/ruff check operator devtools tests handlers bench
	$(BIN)/mypy

demo: need-demo $(if $(NODE),need-node need-image,) venv binaries
	$(BIN)/python -m poolkeeper_dev.demo up --dir $(DEMO_DIR) --seconds $(DEMO_SECONDS) $(if $(NODE),--node,) $(if $(AWS),--aws,)

demo-down: venv
	$(BIN)/python -m poolkeeper_dev.demo down --dir $(DEMO_DIR)

# BENCH_ARGS=--quick: the small points in minutes (writes nothing); --envelope, --shards: the long runs too.
BENCH_ARGS ?=
bench: need-test venv binaries
	$(BIN)/python bench/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .venv-runtime .pytest_cache .mypy_cache .ruff_cache
