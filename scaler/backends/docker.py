"""The ``docker`` backend: each instance is a container of the suite's image, on the suite's network.

Under ``docker compose up`` the scaler runs in a container with the Docker socket
mounted; the targets it starts copy from that container (:func:`template_from`) its
image, its network and its named volumes (models and certificates, read-only), so they
are containers of exactly the same build that see what the compose ``target`` sees.
Each one runs ``llmesh serve target`` on port 50061 and is reached at its network alias
``INSTANCE-ID.DOMAIN`` (the TLS certificates name ``*.DOMAIN``).

Containers carry three labels: the pool, the instance id and the owner (the compose
project of the scaler, or ``--docker-owner``). The owner label is how the backend
follows them: a thread watches Docker's ``die`` events for that label (an instance
that exits on its own is noticed without polling), ``close()`` stops every container
with it, and a scaler that restarts adopts the running ones (:meth:`DockerBackend.adopt`)
and removes the exited ones, so nothing leaks.

Stopping is Docker's own: SIGTERM, SIGKILL after the grace period, then the container
is removed. Docker SDK calls block, so they run in worker threads; the event loop only
reads what the watcher thread recorded.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shlex
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from scaler.backends import Backend, BackendError, LaunchSpec, Launched

log = logging.getLogger(__name__)

LABEL_OWNER = "llmesh.scaler.owner"
LABEL_POOL = "llmesh.pool"
LABEL_INSTANCE = "llmesh.instance-id"
LABEL_ADDRESS = "llmesh.address"
COMPOSE_PROJECT = "com.docker.compose.project"
#: The scaler's own variables that its instances get too (TLS CA, admin token, home, tracing).
INHERITED = ("LLMESH_HOME", "LLMESH_TLS_CA", "LLMESH_ADMIN_TOKEN_FILE", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")
TARGET_PORT = 50061


@dataclass(frozen=True)
class Template:
    """What every container this backend starts shares."""

    image: str
    network: str
    #: Named volumes: ``{volume: {"bind": path, "mode": "ro" | "rw"}}`` (the SDK's shape).
    volumes: Mapping[str, Mapping[str, str]]
    environment: Mapping[str, str]
    #: Flags after ``serve target --host 0.0.0.0 --port 50061 --instance-id ID``.
    args: tuple[str, ...]
    owner: str
    domain: str = "llmesh.internal"
    port: int = TARGET_PORT
    labels: Mapping[str, str] = field(default_factory=dict)
    #: ``HOST:IP`` entries for /etc/hosts (the scaler's own: e.g. where traces go).
    extra_hosts: tuple[str, ...] = ()


def dns_label(text: str) -> str:
    """``text`` as one DNS label: lower case, ``[a-z0-9-]``, at most 63 characters."""
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63].strip("-")
    return label or "instance"


def container_name(owner: str, instance_id: str) -> str:
    """A container name unique per owner and instance (Docker's ``[a-zA-Z0-9][a-zA-Z0-9_.-]*``)."""
    return re.sub(r"[^a-zA-Z0-9_.-]+", "-", f"{owner}.{instance_id}").lstrip("_.-") or "llmesh-instance"


def address_of(template: Template, instance_id: str) -> str:
    return f"{dns_label(instance_id)}.{template.domain}:{template.port}"


def run_arguments(template: Template, spec: LaunchSpec) -> dict:
    """Keyword arguments of ``client.containers.run`` for one instance, except
    ``networking_config`` (its alias), which needs the client's API version."""
    return dict(
        image=template.image,
        command=["serve", "target", "--host", "0.0.0.0", "--port", str(template.port),
                 "--instance-id", spec.instance_id, *template.args],
        name=container_name(template.owner, spec.instance_id),
        labels={**template.labels, LABEL_OWNER: template.owner, LABEL_POOL: spec.pool,
                LABEL_INSTANCE: spec.instance_id, LABEL_ADDRESS: address_of(template, spec.instance_id)},
        environment=dict(template.environment),
        volumes={name: dict(spec_) for name, spec_ in template.volumes.items()},
        network=template.network,
        detach=True,
        restart_policy={"Name": "no"},
        extra_hosts=list(template.extra_hosts),
    )


def describe_exit(state: Mapping) -> str:
    """Why a container is not running, from its ``attrs["State"]``."""
    why = f"container exited with code {state.get('ExitCode', '?')}"
    if state.get("OOMKilled"):
        why += " (killed: out of memory)"
    if state.get("Error"):
        why += f": {state['Error']}"
    return why


def environment(own: Mapping[str, str], extra: str) -> dict[str, str]:
    """The instances' environment: the scaler's :data:`INHERITED` and ``OTEL_*`` variables,
    then ``extra`` (``"K=V K2=V2"``, shell quoting). ValueError for a word without ``=``."""
    env = {k: v for k, v in own.items() if k in INHERITED or k.startswith("OTEL_")}
    for word in shlex.split(extra):
        key, eq, value = word.partition("=")
        if not eq or not key:
            raise ValueError(f"docker_env: {word!r} is not NAME=VALUE")
        env[key] = value
    return env


def parse_volumes(text: str) -> dict[str, dict[str, str]]:
    """``"models:/data:ro certs:/certs:ro"`` in the SDK's shape. ValueError when malformed."""
    volumes = {}
    for word in text.split():
        parts = word.split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1].startswith("/") \
                or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise ValueError(f"docker_volumes: {word!r} is not VOLUME:/PATH[:ro|rw]")
        volumes[parts[0]] = {"bind": parts[1], "mode": parts[2] if len(parts) == 3 else "ro"}
    return volumes


def template_from(own: Mapping | None, *, image: str, network: str, volumes: str, env: Mapping[str, str],
                  extra_env: str, args: str, owner: str, domain: str) -> Template:
    """The template from the configured values, the blanks filled from ``own``, the
    scaler's own container's ``attrs`` (None when it does not run in a container).
    ValueError names what is missing."""
    own = own or {}
    networks = list(own.get("NetworkSettings", {}).get("Networks", {}) or {})
    own_volumes = {m["Name"]: {"bind": m["Destination"], "mode": "ro"}
                   for m in own.get("Mounts", []) if m.get("Type") == "volume" and m.get("Name")}
    labels = own.get("Config", {}).get("Labels", {}) or {}
    template = Template(
        image=image or own.get("Image", ""),
        network=network or (networks[0] if networks else ""),
        volumes=parse_volumes(volumes) if volumes else own_volumes,
        environment=environment(env, extra_env),
        args=tuple(shlex.split(args)),
        owner=owner or labels.get(COMPOSE_PROJECT, "") or own.get("Name", "").strip("/"),
        domain=domain,
        extra_hosts=tuple(own.get("HostConfig", {}).get("ExtraHosts") or ()),
    )
    for name in ("image", "network", "owner"):
        if not getattr(template, name):
            raise ValueError(f"docker backend: no {name}: give the scaler --docker-{name} (it is taken from the "
                             "scaler's own container when the scaler runs in one)")
    return template


class DockerBackend(Backend):
    """Target instances as containers; ``client`` is a ``docker.DockerClient`` (or a fake with its shape)."""

    name = "docker"

    def __init__(self, client, template: Template) -> None:
        self.client = client
        self.template = template
        self._dead: dict[str, str] = {}
        #: Containers it stopped itself: their die events are not deaths (they may arrive after stop()).
        self._stopped: set[str] = set()
        self._lock = threading.Lock()
        self._events = client.events(decode=True, filters={
            "type": "container", "event": "die", "label": f"{LABEL_OWNER}={template.owner}"})
        self._watcher = threading.Thread(target=self._watch, name="docker-events", daemon=True)
        self._watcher.start()

    @classmethod
    def from_config(cls, config, client=None) -> "DockerBackend":
        """The backend of a :class:`scaler.config.ScalerConfig`; BackendError when Docker
        cannot be reached or the template is incomplete."""
        import os

        try:
            import docker

            client = client or docker.from_env()
            client.ping()
        except Exception as exc:  # noqa: BLE001 - the SDK raises several kinds; all mean "no Docker"
            raise BackendError(f"cannot reach the Docker engine ({exc}): mount /var/run/docker.sock "
                               "into the scaler's container or set DOCKER_HOST") from None
        own = None
        try:
            own = client.containers.get(socket.gethostname()).attrs
        except Exception:  # noqa: BLE001 - not in a container (or a renamed host): the flags must say it all
            pass
        try:
            template = template_from(own, image=config.docker_image, network=config.docker_network,
                                     volumes=config.docker_volumes, env=os.environ, extra_env=config.docker_env,
                                     args=config.target_args, owner=config.docker_owner,
                                     domain=config.docker_domain)
        except ValueError as exc:
            raise BackendError(str(exc)) from None
        return cls(client, template)

    # -- the watcher thread -------------------------------------------------------
    def _watch(self) -> None:
        try:
            for event in self._events:
                attrs = event.get("Actor", {}).get("Attributes", {})
                cid = event.get("id") or event.get("Actor", {}).get("ID", "")
                with self._lock:
                    if cid not in self._stopped:
                        self._dead[cid] = f"container exited with code {attrs.get('exitCode', '?')}"
        except Exception:  # noqa: BLE001 - the stream ends with an error when closed
            pass

    # -- Backend --------------------------------------------------------------------
    async def start(self, spec: LaunchSpec) -> Launched:
        return await asyncio.to_thread(self._start, spec)

    def _start(self, spec: LaunchSpec) -> Launched:
        import docker.errors

        kwargs = run_arguments(self.template, spec)
        alias = address_of(self.template, spec.instance_id).rsplit(":", 1)[0]
        kwargs["networking_config"] = {
            self.template.network: self.client.api.create_endpoint_config(aliases=[alias])}
        try:
            container = self.client.containers.run(**kwargs)
        except docker.errors.DockerException as exc:
            raise BackendError(f"could not start a container of {self.template.image} for {spec.instance_id}: "
                               f"{exc}") from None
        return self._launched(container.id, kwargs["name"], kwargs["labels"][LABEL_ADDRESS])

    def _launched(self, cid: str, name: str, address: str) -> Launched:
        return Launched(address, f"container {name} ({cid[:12]})", cid)

    async def stop(self, launched: Launched, grace_s: float) -> None:
        await asyncio.to_thread(self._stop, launched.handle, grace_s)

    def _stop(self, cid: str, grace_s: float) -> None:
        import docker.errors

        with self._lock:
            self._stopped.add(cid)
        try:
            container = self.client.containers.get(cid)
            container.stop(timeout=max(1, round(grace_s)))  # SIGTERM, SIGKILL after the grace period
            container.remove(force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.DockerException as exc:
            raise BackendError(f"could not stop container {cid[:12]}: {exc}") from None
        finally:
            with self._lock:
                self._dead.pop(cid, None)

    def problem(self, launched: Launched) -> str | None:
        with self._lock:
            return self._dead.get(launched.handle)

    def _owned(self) -> list:
        return self.client.containers.list(all=True, filters={"label": f"{LABEL_OWNER}={self.template.owner}"})

    async def adopt(self) -> list[tuple[LaunchSpec, Launched, float]]:
        """The running containers a previous scaler of this owner left (their spec, handle and
        start time); the exited ones are removed."""
        return await asyncio.to_thread(self._adopt)

    def _adopt(self) -> list[tuple[LaunchSpec, Launched, float]]:
        adopted = []
        for container in self._owned():
            labels = container.labels
            if container.status != "running" or LABEL_INSTANCE not in labels or LABEL_ADDRESS not in labels:
                log.info("removing %s (%s) that a previous scaler left", container.name, container.status)
                container.remove(force=True)
                continue
            started = container.attrs.get("State", {}).get("StartedAt", "")
            adopted.append((LaunchSpec(labels[LABEL_INSTANCE], labels.get(LABEL_POOL, "default")),
                            self._launched(container.id, container.name, labels[LABEL_ADDRESS]),
                            _epoch(started)))
        return adopted

    async def close(self, grace_s: float) -> None:
        containers = await asyncio.to_thread(self._owned)
        await asyncio.gather(*[asyncio.to_thread(self._stop, c.id, grace_s) for c in containers])
        self._events.close()


def _epoch(docker_time: str) -> float:
    """Seconds since the epoch of Docker's RFC 3339 time (nanoseconds dropped); now if unreadable."""
    import datetime

    try:
        return datetime.datetime.fromisoformat(docker_time[:26].rstrip("Z") + "+00:00").timestamp()
    except ValueError:
        return time.time()
