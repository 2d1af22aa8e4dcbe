"""The ``kubernetes`` backend: each instance is a pod of a pool's target Deployment.

The conventions are Kubernetes' own, as its autoscalers follow them:

- **Scale up** goes through the Deployment's ``scale`` subresource
  (replicas + 1, the call the HorizontalPodAutoscaler makes); the new pod
  is the instance. A running pod of the Deployment that this scaler has not
  claimed yet (the Deployment's first replica, or pods a restarted scaler
  left) is adopted instead of scaling, so a scaler restart leaks nothing.
- **Scale down**: the controller drains the chosen instance in the router
  and deregisters it first (it picks the one with the least work in flight:
  :meth:`scaler.state.ScalerState.victims`); this backend then marks that
  pod ``controller.kubernetes.io/pod-deletion-cost`` = the lowest int32 and
  lowers replicas by one. The ReplicaSet controller deletes the pods of
  lowest cost first (Kubernetes >= 1.22; best effort by its own
  documentation), and the kubelet sends SIGTERM, then SIGKILL after the
  pod's ``terminationGracePeriodSeconds``.
- **Addresses**: the router learns them from the scaler (it registers each
  pod once SERVING and warmed up). A pod with ``spec.subdomain`` (a
  headless Service of that name) is registered by its DNS name
  ``HOSTNAME.SUBDOMAIN.NAMESPACE.svc.CLUSTER_DOMAIN``, which a TLS
  certificate can name (``*.llmesh-target.llmesh.svc.cluster.local``);
  otherwise by its pod IP.
- A pool's Deployment is the one labelled ``llmesh.io/pool=POOL`` in the
  namespace; the port is its container port named ``grpc``.

Decisions (which pod to adopt, replicas, the annotation, an address, a
pod's problem) are pure functions of :class:`PodView` snapshots; the class
does the API calls, off the event loop (the official client is blocking),
through ``apps`` (``kubernetes.client.AppsV1Api``) and ``core``
(``CoreV1Api``) objects that tests replace with fakes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from scaler.backends import Backend, BackendError, LaunchSpec, Launched

log = logging.getLogger(__name__)

POOL_LABEL = "llmesh.io/pool"
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
#: The lowest pod-deletion-cost (the annotation is an int32): this pod goes first.
LOWEST_COST = -(2 ** 31)
PORT_NAME = "grpc"


@dataclass(frozen=True)
class PodView:
    """What the backend reads of a pod (``kubernetes.client.V1Pod``): name, state, where to reach it."""

    name: str
    phase: str = "Pending"
    ip: str = ""
    #: It has a deletionTimestamp: terminating.
    deleting: bool = False
    ready: bool = False
    hostname: str = ""
    subdomain: str = ""
    #: The container port named ``grpc`` (0: none).
    port: int = 0
    #: Creation time, seconds since the epoch.
    created: float = 0.0
    #: Why its containers last stopped, for messages ("" when none did).
    last_exit: str = ""


@dataclass(frozen=True)
class PodRef:
    """The handle of a launched instance: its pool and pod."""

    pool: str
    pod: str


# -- decisions (pure) --------------------------------------------------------------

def pod_view(pod) -> PodView:
    """The :class:`PodView` of a ``kubernetes.client.V1Pod``."""
    meta, spec, status = pod.metadata, pod.spec, pod.status
    ports = [p.container_port for c in (spec.containers or []) for p in (c.ports or []) if p.name == PORT_NAME]
    ready = any(c.type == "Ready" and c.status == "True" for c in (status.conditions or [])) if status else False
    last_exit = ""
    for c in (status.container_statuses or []) if status else []:
        term = c.last_state.terminated if c.last_state else None
        if term is not None:
            last_exit = f"container {c.name} restarted {c.restart_count} time(s), last {term.reason or 'exited'} " \
                        f"(exit code {term.exit_code})"
    created = meta.creation_timestamp.timestamp() if meta.creation_timestamp else 0.0
    return PodView(meta.name, (status.phase if status else None) or "Pending", (status.pod_ip if status else None)
                   or "", meta.deletion_timestamp is not None, ready, spec.hostname or "", spec.subdomain or "",
                   ports[0] if ports else 0, created, last_exit)


def adoptable(pods: Iterable[PodView], claimed: Iterable[str]) -> PodView | None:
    """The pod a start takes without scaling: one not claimed by an instance,
    not terminating, pending or running; ready ones first, then the oldest."""
    taken = set(claimed)
    free = [p for p in pods if p.name not in taken and not p.deleting and p.phase in ("Pending", "Running")]
    return min(free, key=lambda p: (not p.ready, p.created, p.name), default=None)


def pod_address(pod: PodView, namespace: str, cluster_domain: str) -> str | None:
    """host:port of the pod's gRPC server: its DNS name under its headless
    Service when it has a subdomain, else its IP; None until it has an IP
    (or if it declares no port named ``grpc``)."""
    if not pod.port:
        return None
    if pod.subdomain:
        return f"{pod.hostname or pod.name}.{pod.subdomain}.{namespace}.svc.{cluster_domain}:{pod.port}"
    if not pod.ip:
        return None
    return f"[{pod.ip}]:{pod.port}" if ":" in pod.ip else f"{pod.ip}:{pod.port}"


def pod_problem(pod: PodView | None, name: str) -> str | None:
    """None while the pod runs (or waits to); why the instance is gone otherwise.
    A container the kubelet restarts in place is not gone: the router sees it
    unhealthy, then healthy again, at the same address."""
    if pod is None:
        return f"pod {name} no longer exists"
    if pod.deleting:
        return f"pod {name} is being deleted"
    if pod.phase in ("Failed", "Succeeded"):
        return f"pod {name} ended ({pod.phase}{': ' + pod.last_exit if pod.last_exit else ''})"
    return None


def deletion_cost_patch() -> dict:
    """The pod patch that makes the ReplicaSet controller remove this pod first."""
    return {"metadata": {"annotations": {DELETION_COST: str(LOWEST_COST)}}}


def scale_patch(replicas: int) -> dict:
    """The Deployment ``scale`` subresource patch to ``replicas``."""
    return {"spec": {"replicas": replicas}}


def replicas_after_start(current: int) -> int:
    return current + 1


def replicas_after_stop(current: int) -> int:
    """One fewer, never below 0 (a pod deleted behind our back already lowered the count it had)."""
    return max(0, current - 1)


# -- the backend (I/O) --------------------------------------------------------------

class KubernetesBackend(Backend):
    """Pods of each pool's Deployment in ``namespace``, through the official client's
    ``apps`` (AppsV1Api) and ``core`` (CoreV1Api). ``pod_timeout_s``: longest wait for
    a new pod to appear with an address after a scale up. Event loop only."""

    name = "kubernetes"

    def __init__(self, apps, core, namespace: str, *, cluster_domain: str = "cluster.local",
                 poll_s: float = 1.0, pod_timeout_s: float = 120.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.apps = apps
        self.core = core
        self.namespace = namespace
        self.cluster_domain = cluster_domain
        self.poll_s = poll_s
        self.pod_timeout_s = pod_timeout_s
        self.clock = clock
        #: pod name -> its pool, for the pods handed out as instances.
        self.claimed: dict[str, str] = {}
        #: The last listing of each claimed pod (None: it was not listed).
        self._seen: dict[str, PodView | None] = {}
        self._deployments: dict[str, tuple[str, str]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._watcher: asyncio.Task | None = None

    async def _call(self, fn, *args, **kwargs):
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the client's ApiException, urllib3's errors: one message
            status = getattr(exc, "status", None)
            reason = getattr(exc, "reason", None) or exc
            raise BackendError(f"Kubernetes API: {fn.__name__} failed"
                               f"{f' ({status})' if status else ''}: {reason}") from exc

    async def _deployment(self, pool: str) -> tuple[str, str]:
        """(name, label selector) of the pool's Deployment; BackendError when there is not exactly one."""
        if pool not in self._deployments:
            found = (await self._call(self.apps.list_namespaced_deployment, self.namespace,
                                      label_selector=f"{POOL_LABEL}={pool}")).items
            if len(found) != 1:
                raise BackendError(
                    f"{len(found)} Deployments labelled {POOL_LABEL}={pool} in namespace {self.namespace}, "
                    f"need exactly one: label the pool's target Deployment (deploy/kubernetes/target.yaml "
                    f"is the default pool's)")
            dep = found[0]
            labels = dep.spec.selector.match_labels or {}
            self._deployments[pool] = (dep.metadata.name, ",".join(f"{k}={v}" for k, v in sorted(labels.items())))
        return self._deployments[pool]

    async def _pods(self, selector: str) -> list[PodView]:
        pods = await self._call(self.core.list_namespaced_pod, self.namespace, label_selector=selector)
        return [pod_view(p) for p in pods.items]

    def _lock(self, pool: str) -> asyncio.Lock:
        return self._locks.setdefault(pool, asyncio.Lock())

    async def start(self, spec: LaunchSpec) -> Launched:
        deployment, selector = await self._deployment(spec.pool)
        async with self._lock(spec.pool):
            pods = await self._pods(selector)
            pod = adoptable(pods, self.claimed)
            how = "adopted"
            if pod is None:
                scale = await self._call(self.apps.read_namespaced_deployment_scale, deployment, self.namespace)
                replicas = replicas_after_start(scale.spec.replicas or 0)
                await self._call(self.apps.patch_namespaced_deployment_scale, deployment, self.namespace,
                                 scale_patch(replicas))
                how = f"scaled {deployment} to {replicas}"
            pod, address = await self._addressed(selector, pod)
            self.claimed[pod.name] = spec.pool
            self._seen[pod.name] = pod
        self._watch()
        log.info("instance %s is pod %s (%s) at %s", spec.instance_id, pod.name, how, address)
        return Launched(address, f"pod {pod.name} of deployment {deployment} ({how})", PodRef(spec.pool, pod.name))

    async def _addressed(self, selector: str, pod: PodView | None) -> tuple[PodView, str]:
        """The pod (a new one when None) once it has an address; BackendError after pod_timeout_s."""
        deadline = self.clock() + self.pod_timeout_s
        while True:
            if pod is not None and (address := pod_address(pod, self.namespace, self.cluster_domain)):
                return pod, address
            if self.clock() > deadline:
                what = f"pod {pod.name} has no address (no IP yet, or no container port named {PORT_NAME})" \
                    if pod is not None else "no new pod appeared (quota, node capacity, image pull?)"
                raise BackendError(f"after {self.pod_timeout_s:g} s {what}: see `kubectl -n {self.namespace} "
                                   f"describe pods -l {selector}`")
            await asyncio.sleep(self.poll_s)
            pods = await self._pods(selector)
            pod = next((p for p in pods if p.name == pod.name), None) if pod is not None \
                else adoptable(pods, self.claimed)

    async def stop(self, launched: Launched, grace_s: float) -> None:
        """Marks the pod cheapest to delete, then lowers replicas by one (the kubelet
        gives the pod its terminationGracePeriodSeconds, not ``grace_s``)."""
        ref: PodRef = launched.handle
        deployment, _ = await self._deployment(ref.pool)
        async with self._lock(ref.pool):
            try:
                await self._call(self.core.patch_namespaced_pod, ref.pod, self.namespace, deletion_cost_patch())
            except BackendError as exc:
                if getattr(exc.__cause__, "status", None) != 404:
                    raise
                log.info("pod %s is already gone", ref.pod)
            scale = await self._call(self.apps.read_namespaced_deployment_scale, deployment, self.namespace)
            await self._call(self.apps.patch_namespaced_deployment_scale, deployment, self.namespace,
                             scale_patch(replicas_after_stop(scale.spec.replicas or 0)))
            self.claimed.pop(ref.pod, None)
            self._seen.pop(ref.pod, None)

    def problem(self, launched: Launched) -> str | None:
        ref: PodRef = launched.handle
        return pod_problem(self._seen.get(ref.pod), ref.pod)

    def _watch(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._refresh_loop(), name="kubernetes-pods")

    async def refresh(self) -> None:
        """Reads the claimed pods again (what :meth:`problem` answers from)."""
        for pool in set(self.claimed.values()):
            # Only pods claimed before the listing: one a start claims meanwhile may be newer than it.
            names = [name for name, owner in self.claimed.items() if owner == pool]
            _, selector = await self._deployment(pool)
            listed = {p.name: p for p in await self._pods(selector)}
            for name in names:
                if name in self.claimed:
                    self._seen[name] = listed.get(name)

    async def _refresh_loop(self) -> None:
        while self.claimed:
            try:
                await self.refresh()
            except BackendError as exc:  # the API is unreachable: keep the last listing
                log.warning("%s", exc)
            await asyncio.sleep(self.poll_s)

    async def close(self, grace_s: float) -> None:
        """Leaves the pods to their Deployment (a restarted scaler adopts them); stops watching."""
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None


def from_cluster(namespace: str = "", cluster_domain: str = "cluster.local") -> KubernetesBackend:
    """A backend on the cluster this process runs in (its service account), or the
    current kubeconfig context outside one. ``namespace`` "" means the pod's own
    namespace (from the service account) or "default". BackendError without either."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
        in_cluster = True
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as exc:
            raise BackendError(f"no Kubernetes API to talk to: not in a pod and no kubeconfig ({exc})") from None
        in_cluster = False
    if not namespace:
        path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
        try:
            namespace = open(path).read().strip() if in_cluster else "default"
        except OSError:
            namespace = "default"
    return KubernetesBackend(client.AppsV1Api(), client.CoreV1Api(), namespace, cluster_domain=cluster_domain)
