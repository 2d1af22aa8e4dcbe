"""The container deployment, checked as data: docker-compose.yml, the
Dockerfile, the Prometheus config and .dockerignore (no Docker needed)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LLMESH = ("router", "target", "draft", "monitor", "scaler")
PORTS = {"router": 50051, "target": 50061, "draft": 50071, "monitor": 50081, "scaler": 50091}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_the_suite_and_its_observability_are_all_there(services):
    assert set(LLMESH) | {"models", "jaeger", "prometheus", "grafana"} <= set(services)
    assert services["jaeger"]["image"].startswith("jaegertracing/all-in-one")


@pytest.mark.parametrize("name", LLMESH)
def test_each_service_is_llmesh_serve_on_all_interfaces(services, name):
    command = services[name]["command"]
    assert command[:2] == ["serve", name]
    assert flag(command, "--host") == "0.0.0.0" and flag(command, "--port") == str(PORTS[name])
    assert services[name]["build"]["dockerfile"] == "docker/Dockerfile"


@pytest.mark.parametrize("name", LLMESH)
def test_each_service_is_healthy_when_grpc_health_says_serving(services, name):
    check = services[name]["healthcheck"]
    assert check["test"] == ["CMD", "python", "-m", "services.common.healthcheck", f"127.0.0.1:{PORTS[name]}"]
    assert check["start_period"] and check["interval"] and check["retries"] >= 1
    assert importlib.util.find_spec("services.common.healthcheck") is not None


def test_only_the_router_is_published_among_the_llmesh_services(services):
    assert services["router"]["ports"] == ["${LLMESH_ROUTER_PUBLISH:-50051}:50051", "${LLMESH_HTTP_PUBLISH:-8000}:8000"]
    assert [name for name in LLMESH if services[name].get("ports")] == ["router"]


def test_models_are_built_once_into_a_volume_the_model_services_mount(compose, services):
    assert "models" in compose["volumes"]
    assert services["models"]["command"] == ["models", "build"]
    assert services["models"]["restart"] == "no"
    assert "models:/data" in services["models"]["volumes"]
    home = services["models"]["environment"]["LLMESH_HOME"]
    for name in ("target", "draft"):
        assert any(v.split(":")[:2] == ["models", home] for v in services[name]["volumes"])
        assert services[name]["environment"]["LLMESH_HOME"] == home
        assert services[name]["depends_on"]["models"] == {"condition": "service_completed_successfully"}


def test_start_order_waits_for_health(services):
    def needs(name):
        return {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()}

    assert needs("router")["target"] == needs("router")["draft"] == "service_healthy"
    assert needs("monitor")["router"] == "service_healthy"
    assert needs("scaler")["router"] == needs("scaler")["monitor"] == "service_healthy"


@pytest.mark.parametrize("name", LLMESH)
def test_traces_go_to_jaeger_over_otlp(services, name):
    endpoint = urlparse(services[name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert endpoint.hostname == "jaeger" and endpoint.port == 4317
    assert services[name]["environment"]["OMP_WAIT_POLICY"] == "PASSIVE"


def test_every_address_in_a_command_names_a_service_and_its_port(services):
    for name in LLMESH:
        for word in services[name]["command"]:
            for host, port in re.findall(r"([a-z][a-z0-9-]*):(\d+)", word):
                assert host in LLMESH, f"{name}: {word}"
                assert flag(services[host]["command"], "--port") == port, f"{name}: {word}"


def test_prometheus_scrapes_the_monitor_exposition_port(services):
    config = yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert f"monitor:{flag(services['monitor']['command'], '--prometheus-port')}" in targets
    assert "./docker/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]


@pytest.mark.parametrize("name", ["target", "draft", "scaler"])
def test_prometheus_scrapes_each_services_own_metrics_port(services, name):
    config = yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())
    jobs = {t: job for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    job = jobs[f"{name}:{flag(services[name]['command'], '--metrics-port')}"]
    assert job["honor_labels"] is True  # the series' own `instance` (the llmesh id) wins


def test_grafana_provisions_the_dashboard_from_prometheus_by_uid(services):
    volumes = services["grafana"]["volumes"]
    provider = yaml.safe_load((REPO / "docker" / "grafana" / "dashboards.yml").read_text())["providers"][0]
    assert f"./docker/grafana/llmesh.json:{provider['options']['path']}/llmesh.json:ro" in volumes
    assert "./docker/grafana/dashboards.yml:/etc/grafana/provisioning/dashboards/llmesh.yml:ro" in volumes
    sources = yaml.safe_load((REPO / "docker" / "grafana" / "datasources.yml").read_text())["datasources"]
    uids = {s["uid"] for s in sources if s["type"] == "prometheus"}
    import json
    dashboard = json.loads((REPO / "docker" / "grafana" / "llmesh.json").read_text())
    assert {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]} <= uids


def test_the_dockerfile_installs_cpu_torch_first_then_the_project_and_runs_llmesh():
    text = (REPO / "docker" / "Dockerfile").read_text()
    lines = [line.strip() for line in text.replace("\\\n", " ").splitlines() if line.strip()
             and not line.lstrip().startswith("#")]
    assert lines[0] == "ARG BASE_IMAGE=python:3.11-slim"
    assert "ARG TORCH=torch==2.13.0" in lines and "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in lines

    def first(pattern: str) -> int:
        return next(i for i, line in enumerate(lines) if re.search(pattern, line))

    torch = first(r'pip install -q "\$\{TORCH\}" --index-url "\$\{TORCH_INDEX_URL\}"')
    stubs = first(r"grpc_tools\.protoc -I protos .*--grpc_python_out=build/gen")
    project = first(r"pip install -q --no-deps --no-build-isolation --target /opt/llmesh-app \.(\s|$)")
    final = first(r"^FROM \$\{BASE_IMAGE\}$")  # the image users run: no wheelhouse, no build tools
    assert torch < stubs < project < final
    # The dependencies' venv and the project are separate layers: a code change stores a few MiB, not the
    # venv again (CI's engine filled its disk at 1.5 GB a rebuild).
    deps, app = first(r"^COPY --from=deps /opt/llmesh /opt/llmesh$"), first(r"^COPY --from=build /opt/llmesh-app ")
    assert final < deps < app
    assert "FROM deps AS build" in lines and "LABEL org.opencontainers.image.title=llmesh" in lines
    assert lines[-2] == 'ENTRYPOINT ["llmesh"]'


def test_the_scaler_scales_target_containers_through_the_docker_socket(services):
    scaler = services["scaler"]
    assert flag(scaler["command"], "--backend") == "docker" and "--default-max-instances" not in scaler["command"]
    assert "/var/run/docker.sock:/var/run/docker.sock" in scaler["volumes"]
    assert any(v.split(":")[0] == "models" for v in scaler["volumes"])  # what its targets mount
    assert "*.llmesh.internal" in services["certs"]["command"]  # the started targets' network aliases


def test_dockerignore_keeps_local_environments_out():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "build", ".git", "**/__pycache__"} <= set(ignored)


def test_compose_itself_accepts_the_file():
    """Compose's own schema check (`docker-compose config`: depends_on
    conditions, volume and environment merges), where Compose is installed."""
    import shutil
    import subprocess

    tool = shutil.which("docker-compose")
    argv = [tool, "config", "--quiet"] if tool else None
    if argv is None and shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        argv = ["docker", "compose", "config", "--quiet"] if probe.returncode == 0 else None
    if argv is None:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed")
    run = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
