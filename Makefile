# llmesh: `make up` installs everything and starts the suite; `make test`
# installs everything and runs every test.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
LLMESH := $(VENV)/bin/llmesh
TORCH  := torch==2.13.0
GEN    := build/gen
PROTOS := $(wildcard protos/llmesh/v1/*.proto)

.PHONY: install protos up test bench models clean

# The venv, torch first (a local CPU wheel: an unpinned torch pulls CUDA), then
# the project with its dev extras. The stamp makes a second run a no-op.
$(VENV)/.installed: pyproject.toml $(PROTOS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check $(TORCH)
	$(PIP) install -q --disable-pip-version-check grpcio-tools setuptools wheel
	$(MAKE) protos
	$(PIP) install -q --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# One build step makes every stub from protos/; nothing generated is edited or committed.
protos:
	rm -rf $(GEN) && mkdir -p $(GEN)
	$(PY) -m grpc_tools.protoc -I protos --python_out=$(GEN) --pyi_out=$(GEN) --grpc_python_out=$(GEN) $(PROTOS)
	touch $(GEN)/llmesh/__init__.py $(GEN)/llmesh/v1/__init__.py

models: install
	$(LLMESH) models build

up: install
	$(LLMESH) models build
	$(LLMESH) up

# curl: the front door's SSE framing is checked with it (installed with apt when root).
test: install
	command -v curl >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq curl; }
	$(PY) -m pytest -q

bench: install
	$(PIP) install -q --disable-pip-version-check -e '.[dev,bench]'
	$(LLMESH) models build
	$(LLMESH) bench --all --markdown BENCHMARKS.md

clean:
	rm -rf $(GEN) *.egg-info
