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

.PHONY: install protos up down test bench models clean docker-deps docker-wheels docker-image

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
	$(LLMESH) up $(UP_ARGS)

# Stops what `make up` / `llmesh up` started, from another shell (DOWN_ARGS: e.g. --base-port 56051).
down:
	$(LLMESH) down $(DOWN_ARGS)

# curl: the front door's SSE framing is checked with it (installed with apt when root).
test: install docker-deps
	command -v curl >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq curl; }
	$(PY) -m pytest -q

bench: install
	$(PIP) install -q --disable-pip-version-check -e '.[dev,bench]'
	$(LLMESH) models build
	$(LLMESH) bench --all --markdown BENCHMARKS.md

clean:
	rm -rf $(GEN) *.egg-info

# -- containers ---------------------------------------------------------------
# What tests/test_compose_e2e.py needs: a Docker engine, Compose, debootstrap (a
# base image from Debian's packages where no registry answers) and Prometheus
# (it scrapes the monitor). Installed with apt when root and missing; elsewhere
# that test is skipped with the reason.
DOCKER_DEBS := docker.io docker-compose debootstrap prometheus
docker-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null \
	    && ! (command -v dockerd && command -v docker-compose && command -v debootstrap \
	          && command -v prometheus) > /dev/null; then \
	    echo "installing $(DOCKER_DEBS)"; \
	    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	        --no-install-recommends $(DOCKER_DEBS)) > build/apt-docker.log 2>&1 \
	        || echo "apt-get install $(DOCKER_DEBS) failed (build/apt-docker.log): the compose test will say why it is skipped"; \
	fi

# The image from a local base and a host wheelhouse: nothing is pulled, pip in the
# build reaches no index (torch is this machine's CPU wheel when pip's find-links
# has it). Users with a registry can simply `docker compose build`.
IMAGE      ?= llmesh:latest
BASE_IMAGE ?= llmesh-base:bookworm
DEBIAN_MIRROR ?= $(shell sed -n 's|^URIs: *\(http[^ ]*/debian\)$$|\1|p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
docker-wheels: install
	mkdir -p docker/wheels
	$(PY) -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
	    > build/docker-requirements.txt
	$(PIP) download -q --disable-pip-version-check -d docker/wheels -r build/docker-requirements.txt \
	    grpcio-tools setuptools wheel

docker-image: docker-wheels
	docker/base-image.sh $(BASE_IMAGE) $(or $(DEBIAN_MIRROR),http://deb.debian.org/debian)
	docker build -q -f docker/Dockerfile -t $(IMAGE) --build-arg BASE_IMAGE=$(BASE_IMAGE) \
	    --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/wheels .
	@# The llmesh image this build replaced, untagged now (only llmesh's: the label): rebuilds do not pile up.
	docker image prune -f --filter label=org.opencontainers.image.title=llmesh > /dev/null
