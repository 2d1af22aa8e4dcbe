"""The scaler's docker backend against a fake Docker client: what it asks Docker to
run, how it finds its template in its own container, how it notices a container that
died, stops, adopts and cleans up (the real engine: tests/test_compose_e2e.py)."""

from __future__ import annotations

import queue

import docker.errors
import pytest

from scaler.backends import BackendError, LaunchSpec
from scaler.backends.docker import (LABEL_ADDRESS, LABEL_INSTANCE, LABEL_OWNER, LABEL_POOL, DockerBackend,
                                    Template, address_of, container_name, describe_exit, dns_label, environment,
                                    parse_volumes, run_arguments, template_from)
from scaler.config import ScalerConfig
from tests.conftest import eventually

OWN = {  # the parts of `docker inspect` of the scaler's own container that the template reads
    "Image": "sha256:abc",
    "Name": "/llmesh_scaler_1",
    "Config": {"Labels": {"com.docker.compose.project": "llmesh"}},
    "HostConfig": {"ExtraHosts": ["host.docker.internal:host-gateway"]},
    "NetworkSettings": {"Networks": {"llmesh_default": {}}},
    "Mounts": [{"Type": "volume", "Name": "llmesh_models", "Destination": "/data"},
               {"Type": "volume", "Name": "llmesh_certs", "Destination": "/certs"},
               {"Type": "bind", "Source": "/var/run/docker.sock", "Destination": "/var/run/docker.sock"}],
}
ENV = {"LLMESH_HOME": "/data", "LLMESH_TLS_CA": "/certs/ca.crt", "LLMESH_TLS_CERT": "/certs/scaler.crt",
       "OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4317", "PATH": "/usr/bin"}


def template(**overrides) -> Template:
    values = dict(image="", network="", volumes="", env=ENV,
                  extra_env="LLMESH_TLS_CERT=/certs/target.crt LLMESH_TLS_KEY=/certs/target.key",
                  args="--draft-address draft:50071", owner="", domain="llmesh.internal")
    return template_from(OWN, **{**values, **overrides})


def test_the_template_copies_the_scalers_own_image_network_and_named_volumes():
    t = template()
    assert (t.image, t.network, t.owner) == ("sha256:abc", "llmesh_default", "llmesh")
    assert t.volumes == {"llmesh_models": {"bind": "/data", "mode": "ro"},
                         "llmesh_certs": {"bind": "/certs", "mode": "ro"}}  # not the Docker socket
    # the scaler's own certificate is replaced by the target's; PATH is not passed on
    assert t.environment == {"LLMESH_HOME": "/data", "LLMESH_TLS_CA": "/certs/ca.crt",
                             "LLMESH_TLS_CERT": "/certs/target.crt", "LLMESH_TLS_KEY": "/certs/target.key",
                             "OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4317"}


def test_flags_override_the_template_and_a_scaler_outside_a_container_must_name_everything():
    t = template_from(None, image="llmesh:1", network="net", volumes="m:/data c:/certs:rw", env={}, extra_env="",
                      args="", owner="me", domain="d.example")
    assert t.volumes == {"m": {"bind": "/data", "mode": "ro"}, "c": {"bind": "/certs", "mode": "rw"}}
    with pytest.raises(ValueError, match="--docker-image"):
        template_from(None, image="", network="net", volumes="", env={}, extra_env="", args="", owner="me",
                      domain="d")
    for bad in ("models", "models:data", "m:/data:rx"):
        with pytest.raises(ValueError, match="VOLUME:/PATH"):
            parse_volumes(bad)
    with pytest.raises(ValueError, match="NAME=VALUE"):
        environment({}, "JUSTANAME")


def test_an_instance_is_a_labelled_target_container_reached_at_its_alias():
    spec = LaunchSpec("default-auto-1", "default")
    kwargs = run_arguments(template(), spec)
    assert kwargs["command"] == ["serve", "target", "--host", "0.0.0.0", "--port", "50061",
                                 "--instance-id", "default-auto-1", "--draft-address", "draft:50071"]
    assert kwargs["labels"] == {LABEL_OWNER: "llmesh", LABEL_POOL: "default", LABEL_INSTANCE: "default-auto-1",
                                LABEL_ADDRESS: "default-auto-1.llmesh.internal:50061"}
    assert kwargs["network"] == "llmesh_default" and kwargs["image"] == "sha256:abc"
    assert kwargs["restart_policy"] == {"Name": "no"} and kwargs["detach"]
    assert kwargs["extra_hosts"] == ["host.docker.internal:host-gateway"]  # the scaler's own
    assert kwargs["name"] == "llmesh.default-auto-1"


def test_names_are_valid_for_docker_and_dns_whatever_the_pool():
    assert dns_label("Pool_A/auto 1") == "pool-a-auto-1"
    assert dns_label("///") == "instance" and len(dns_label("x" * 100)) == 63
    assert container_name("proj", "a b/c") == "proj.a-b-c"
    t = template()
    assert address_of(t, "Big Pool-auto-3") == "big-pool-auto-3.llmesh.internal:50061"


def test_an_exit_is_described_from_the_container_state():
    assert describe_exit({"ExitCode": 137, "OOMKilled": True}) == "container exited with code 137 (killed: out of memory)"
    assert describe_exit({"ExitCode": 1, "Error": "no such file"}) == "container exited with code 1: no such file"


class FakeEvents:
    def __init__(self) -> None:
        self.q: queue.Queue = queue.Queue()
        self.closed = False

    def __iter__(self):
        while (event := self.q.get()) is not None:
            yield event

    def close(self) -> None:
        self.closed = True
        self.q.put(None)


class FakeContainer:
    def __init__(self, client, cid: str, name: str, labels: dict, status: str = "running") -> None:
        self.client, self.id, self.name, self.labels, self.status = client, cid, name, labels, status
        self.attrs = {"State": {"StartedAt": "2026-11-30T15:00:00.123456789Z"}}
        self.stopped_with: int | None = None

    def stop(self, timeout: int) -> None:
        self.stopped_with = timeout
        self.status = "exited"
        self.client.events_stream.q.put({"id": self.id, "Actor": {"Attributes": {"exitCode": "0"}}})

    def remove(self, force: bool = False) -> None:
        self.client.containers.removed.append(self.id)
        self.client.containers.all.pop(self.id, None)


class FakeContainers:
    def __init__(self, client) -> None:
        self.client, self.all, self.removed, self.runs = client, {}, [], []
        self.fail: Exception | None = None

    def run(self, **kwargs) -> FakeContainer:
        if self.fail:
            raise self.fail
        self.runs.append(kwargs)
        c = FakeContainer(self.client, f"{len(self.runs):064x}", kwargs["name"], kwargs["labels"])
        self.all[c.id] = c
        return c

    def get(self, cid: str) -> FakeContainer:
        try:
            return self.all[cid]
        except KeyError:
            raise docker.errors.NotFound(cid) from None

    def list(self, all: bool, filters: dict) -> list[FakeContainer]:
        key, value = filters["label"].split("=", 1)
        return [c for c in self.all.values() if c.labels.get(key) == value]


class FakeAPI:
    def create_endpoint_config(self, aliases):
        return {"Aliases": aliases}


class FakeDocker:
    def __init__(self) -> None:
        self.events_stream = FakeEvents()
        self.containers = FakeContainers(self)
        self.api = FakeAPI()
        self.filters: dict | None = None

    def events(self, decode: bool, filters: dict) -> FakeEvents:
        self.filters = filters
        return self.events_stream


@pytest.fixture
def fake():
    return FakeDocker()


async def test_start_runs_a_container_on_the_network_under_its_alias(fake):
    backend = DockerBackend(fake, template())
    launched = await backend.start(LaunchSpec("default-auto-1", "default"))
    (run,) = fake.containers.runs
    assert run["networking_config"] == {"llmesh_default": {"Aliases": ["default-auto-1.llmesh.internal"]}}
    assert launched.address == "default-auto-1.llmesh.internal:50061"
    assert launched.ref.startswith("container llmesh.default-auto-1 (")
    assert fake.filters == {"type": "container", "event": "die", "label": f"{LABEL_OWNER}=llmesh"}
    assert backend.problem(launched) is None
    await backend.close(1)


async def test_a_docker_error_on_start_is_a_backend_error_that_says_why(fake):
    backend = DockerBackend(fake, template())
    fake.containers.fail = docker.errors.ImageNotFound("No such image: sha256:abc")
    with pytest.raises(BackendError, match="could not start a container of sha256:abc for x: .*No such image"):
        await backend.start(LaunchSpec("x", "default"))
    await backend.close(1)


async def test_a_container_that_dies_is_noticed_from_docker_events(fake):
    backend = DockerBackend(fake, template())
    launched = await backend.start(LaunchSpec("default-auto-1", "default"))
    fake.events_stream.q.put({"id": launched.handle, "Actor": {"Attributes": {"exitCode": "137"}}})
    assert await eventually(lambda: backend.problem(launched)) == "container exited with code 137"
    await backend.close(1)


async def test_stop_is_sigterm_then_kill_after_the_grace_period_then_remove(fake):
    backend = DockerBackend(fake, template())
    launched = await backend.start(LaunchSpec("default-auto-1", "default"))
    container = fake.containers.all[launched.handle]
    await backend.stop(launched, 12.4)
    assert container.stopped_with == 12 and fake.containers.removed == [launched.handle]
    assert backend.problem(launched) is None  # a stop it asked for is not a death
    await backend.stop(launched, 1)  # already gone: nothing to do
    await backend.close(1)


async def test_close_stops_every_container_it_owns_and_ends_the_watcher(fake):
    backend = DockerBackend(fake, template())
    for i in (1, 2):
        await backend.start(LaunchSpec(f"default-auto-{i}", "default"))
    stranger = FakeContainer(fake, "f" * 64, "other", {LABEL_OWNER: "someone-else"})
    fake.containers.all[stranger.id] = stranger
    await backend.close(5)
    assert list(fake.containers.all) == [stranger.id] and fake.events_stream.closed
    backend._watcher.join(5)
    assert not backend._watcher.is_alive()


async def test_a_restarted_scaler_adopts_running_containers_and_removes_exited_ones(fake):
    first = DockerBackend(fake, template())
    running = await first.start(LaunchSpec("default-auto-1", "default"))
    exited = await first.start(LaunchSpec("default-auto-2", "default"))
    fake.containers.all[exited.handle].status = "exited"
    second = DockerBackend(fake, template())
    ((spec, launched, started_at),) = await second.adopt()
    assert spec == LaunchSpec("default-auto-1", "default")
    assert (launched.address, launched.handle) == (running.address, running.handle)
    assert started_at == pytest.approx(1796050800.123456)
    assert fake.containers.removed == [exited.handle]
    for backend in (first, second):
        await backend.close(1)


def test_the_config_names_the_docker_backend_and_its_fields():
    config = ScalerConfig.from_args(["--backend", "docker", "--docker-env", "A=1", "--docker-owner", "me"])
    assert config.backend.value == "docker" and config.docker_env == "A=1" and config.docker_owner == "me"
