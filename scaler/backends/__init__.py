"""Where the scaler's instances run, behind one small interface.

A backend starts a model-service instance and says where to reach it,
stops one it started, and tells whether one has died on its own. Readiness,
warm-up, registration and draining are the controller's, the same for
every backend. ``local`` runs processes on this machine, ``docker``
containers of the suite's image (:mod:`scaler.backends.docker`), ``kubernetes``
pods of a pool's Deployment.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from scaler.policy import HostLimit


class BackendError(RuntimeError):
    """A backend could not start or stop an instance; the message says why."""


@dataclass(frozen=True)
class LaunchSpec:
    """What to start: a target instance of a pool, under the registry id it will have."""

    instance_id: str
    pool: str


@dataclass(frozen=True)
class Launched:
    """A started instance: where to reach it, and the backend's handle on it."""

    address: str
    #: Shown to operators: a process id, a container id, a pod name.
    ref: str
    handle: object


class Backend(abc.ABC):
    """Starts and stops model-service instances."""

    name: str = ""

    @abc.abstractmethod
    async def start(self, spec: LaunchSpec) -> Launched:
        """Starts an instance (it need not be ready yet); BackendError when it cannot."""

    @abc.abstractmethod
    async def stop(self, launched: Launched, grace_s: float) -> None:
        """Asks the instance to stop (SIGTERM or its equivalent), forces it after ``grace_s``."""

    @abc.abstractmethod
    def problem(self, launched: Launched) -> str | None:
        """None while the instance runs; why it is gone once it has exited on its own."""

    def max_targets(self) -> HostLimit | None:
        """The most targets this backend can usefully run at once, over every pool, and why;
        None: no limit of its own (the default: containers and pods run elsewhere, where the
        Docker host's or the cluster's own limits apply)."""
        return None

    async def close(self, grace_s: float) -> None:
        """Stops whatever this backend still runs (the scaler is shutting down)."""

    async def adopt(self) -> list[tuple[LaunchSpec, Launched, float]]:
        """Instances a previous scaler of this deployment started and left running, with
        their wall-clock start times: the controller manages them as its own. None by default
        (local processes die with the scaler)."""
        return []


class NotImplementedBackend(BackendError):
    pass


def refuse(name: str) -> None:
    """A backend declared (config, protos) but not written yet."""
    raise NotImplementedBackend(
        f"backend {name!r} is not implemented yet. "
        "Run it with --backend local (the default) or docker, or scale by hand until the "
        f"{name} backend lands.")
