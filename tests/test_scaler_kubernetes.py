"""The scaler's kubernetes backend: its pure decisions, its API calls against a fake
cluster (the official client's own model objects, a ReplicaSet that honours
pod-deletion-cost), and the whole scaler scaling a Deployment 1 -> 2 -> 1 through it."""

from __future__ import annotations

import datetime
import itertools

import grpc
import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from scaler.backends import BackendError, LaunchSpec
from scaler.backends.kubernetes import (DELETION_COST, LOWEST_COST, POOL_LABEL, KubernetesBackend, PodView,
                                        adoptable, deletion_cost_patch, pod_address, pod_problem, pod_view,
                                        replicas_after_stop, scale_patch)
from scaler.config import ScalerConfig
from scaler.main import create_server, main
from services.common.stubs import router_pb2, scaler_pb2, scaler_pb2_grpc
from tests.conftest import free_port
from tests.test_monitor_fakes import FakeRouter, eventually
from tests.test_scaler_fakes import FakeTarget

EPOCH = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)


# -- decisions (pure) ---------------------------------------------------------------

def test_a_start_adopts_a_free_ready_pod_first_then_the_oldest():
    pods = [PodView("a", "Running", ready=True, created=3), PodView("b", "Running", ready=False, created=1),
            PodView("c", "Running", ready=True, created=2), PodView("d", "Running", ready=True, deleting=True),
            PodView("e", "Failed", created=0)]
    assert adoptable(pods, claimed=[]).name == "c"
    assert adoptable(pods, claimed=["c"]).name == "a"
    assert adoptable(pods, claimed=["a", "c"]).name == "b"
    assert adoptable(pods, claimed=["a", "b", "c"]) is None  # terminating and ended pods are never taken


def test_a_pod_is_addressed_by_its_dns_name_under_its_headless_service_else_by_ip():
    pod = PodView("llmesh-target-7d9f-x2", "Running", ip="10.1.2.3", subdomain="llmesh-target", port=50061)
    assert pod_address(pod, "llmesh", "cluster.local") == \
        "llmesh-target-7d9f-x2.llmesh-target.llmesh.svc.cluster.local:50061"
    assert pod_address(PodView("p", ip="10.1.2.3", port=50061), "ns", "cluster.local") == "10.1.2.3:50061"
    assert pod_address(PodView("p", ip="fd00::7", port=50061), "ns", "cluster.local") == "[fd00::7]:50061"
    assert pod_address(PodView("p", port=50061), "ns", "cluster.local") is None  # no IP yet
    assert pod_address(PodView("p", ip="10.1.2.3"), "ns", "cluster.local") is None  # no port named grpc


def test_a_pod_is_gone_when_deleted_terminating_or_ended_not_when_its_container_restarts():
    assert pod_problem(None, "p") == "pod p no longer exists"
    assert "being deleted" in pod_problem(PodView("p", "Running", deleting=True), "p")
    ended = pod_problem(PodView("p", "Failed", last_exit="container target restarted 3 time(s), last OOMKilled"), "p")
    assert "Failed" in ended and "OOMKilled" in ended
    assert pod_problem(PodView("p", "Running", last_exit="container target restarted 1 time(s)"), "p") is None
    assert pod_problem(PodView("p", "Pending"), "p") is None


def test_the_pod_to_remove_is_marked_cheapest_and_replicas_never_go_negative():
    assert deletion_cost_patch() == {"metadata": {"annotations": {DELETION_COST: "-2147483648"}}}
    assert LOWEST_COST == -2 ** 31  # int32's lowest: below any cost another tool sets
    assert scale_patch(3) == {"spec": {"replicas": 3}}
    assert [replicas_after_stop(n) for n in (0, 1, 4)] == [0, 0, 3]


def test_pod_view_reads_the_clients_model_objects():
    pod = make_pod("t-1", port=50061, subdomain="llmesh-target", ip="10.0.0.9", ready=True)
    pod.status.container_statuses = [client.V1ContainerStatus(
        name="target", image="llmesh", image_id="", ready=True, restart_count=2,
        last_state=client.V1ContainerState(terminated=client.V1ContainerStateTerminated(exit_code=137,
                                                                                        reason="OOMKilled")))]
    view = pod_view(pod)
    assert (view.name, view.phase, view.ip, view.port, view.subdomain, view.ready, view.deleting) == \
        ("t-1", "Running", "10.0.0.9", 50061, "llmesh-target", True, False)
    assert view.created == EPOCH.timestamp() + 1
    assert "OOMKilled" in view.last_exit and "2 time(s)" in view.last_exit


# -- a fake cluster -------------------------------------------------------------------

def make_pod(name: str, port: int, subdomain: str = "", ip: str = "127.0.0.1", ready: bool = True,
             created: int = 1) -> client.V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels={"app.kubernetes.io/name": "llmesh-target"}, annotations={},
                                     creation_timestamp=EPOCH + datetime.timedelta(seconds=created)),
        spec=client.V1PodSpec(subdomain=subdomain or None, containers=[client.V1Container(
            name="target", ports=[client.V1ContainerPort(name="grpc", container_port=port)])]),
        status=client.V1PodStatus(phase="Running", pod_ip=ip, conditions=[
            client.V1PodCondition(type="Ready", status="True" if ready else "False")]))


class FakeCluster:
    """AppsV1Api and CoreV1Api for one Deployment, its pods made by a ReplicaSet that, as
    Kubernetes' does, removes the pods of lowest pod-deletion-cost first, then the newest.
    ``ports`` gives each new pod's gRPC port (a FakeTarget's); ``hold`` stops pod creation."""

    def __init__(self, ports, replicas: int = 1, pool: str = "default", subdomain: str = "") -> None:
        self.ports = iter(ports)
        self.pool = pool
        self.subdomain = subdomain
        self.replicas = 0
        self.pods: dict[str, client.V1Pod] = {}
        self.deleted: list[str] = []
        self.calls: list[str] = []
        self.hold = False
        self.fail: ApiException | None = None
        self._names = itertools.count(1)
        self._reconcile(replicas)

    def _reconcile(self, replicas: int) -> None:
        self.replicas = replicas
        while len(self.pods) < replicas and not self.hold:
            n = next(self._names)
            name = f"llmesh-target-{n}"
            self.pods[name] = make_pod(name, next(self.ports), self.subdomain, created=n)
        while len(self.pods) > replicas:
            def rank(pod):
                cost = int((pod.metadata.annotations or {}).get(DELETION_COST, "0"))
                return cost, -pod.metadata.creation_timestamp.timestamp()
            victim = min(self.pods.values(), key=rank).metadata.name
            del self.pods[victim]
            self.deleted.append(victim)

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if self.fail is not None:
            raise self.fail

    # AppsV1Api
    def list_namespaced_deployment(self, namespace, label_selector=""):
        self._call("list_namespaced_deployment")
        items = [client.V1Deployment(
            metadata=client.V1ObjectMeta(name="llmesh-target", labels={POOL_LABEL: self.pool}),
            spec=client.V1DeploymentSpec(
                selector=client.V1LabelSelector(match_labels={"app.kubernetes.io/name": "llmesh-target"}),
                template=client.V1PodTemplateSpec()))]
        return client.V1DeploymentList(items=items if label_selector == f"{POOL_LABEL}={self.pool}" else [])

    def read_namespaced_deployment_scale(self, name, namespace):
        self._call("read_namespaced_deployment_scale")
        return client.V1Scale(spec=client.V1ScaleSpec(replicas=self.replicas))

    def patch_namespaced_deployment_scale(self, name, namespace, body):
        self._call("patch_namespaced_deployment_scale")
        self._reconcile(body["spec"]["replicas"])

    # CoreV1Api
    def list_namespaced_pod(self, namespace, label_selector=""):
        self._call("list_namespaced_pod")
        assert label_selector == "app.kubernetes.io/name=llmesh-target"
        return client.V1PodList(items=list(self.pods.values()))

    def patch_namespaced_pod(self, name, namespace, body):
        self._call("patch_namespaced_pod")
        if name not in self.pods:
            raise ApiException(status=404, reason="Not Found")
        self.pods[name].metadata.annotations.update(body["metadata"]["annotations"])


def backend_of(cluster: FakeCluster, **kw) -> KubernetesBackend:
    return KubernetesBackend(cluster, cluster, "llmesh", poll_s=0.01, **kw)


# -- the backend against the fake cluster ----------------------------------------------

async def test_a_start_adopts_the_deployments_first_pod_then_scales_up_by_one():
    cluster = FakeCluster(range(50061, 50070), replicas=1, subdomain="llmesh-target")
    backend = backend_of(cluster)
    first = await backend.start(LaunchSpec("default-auto-1", "default"))
    assert first.address == "llmesh-target-1.llmesh-target.llmesh.svc.cluster.local:50061"
    assert cluster.replicas == 1 and "patch_namespaced_deployment_scale" not in cluster.calls
    second = await backend.start(LaunchSpec("default-auto-2", "default"))
    assert cluster.replicas == 2
    assert second.address == "llmesh-target-2.llmesh-target.llmesh.svc.cluster.local:50062"
    assert "scaled llmesh-target to 2" in second.ref
    assert set(backend.claimed) == {"llmesh-target-1", "llmesh-target-2"}
    await backend.close(0)


async def test_concurrent_starts_take_distinct_pods():
    import asyncio

    cluster = FakeCluster(range(50061, 50070), replicas=0)
    backend = backend_of(cluster)
    launched = await asyncio.gather(*[backend.start(LaunchSpec(f"i{n}", "default")) for n in range(3)])
    assert cluster.replicas == 3
    assert len({x.address for x in launched}) == 3
    await backend.close(0)


async def test_a_stop_removes_exactly_the_chosen_pod_through_its_deletion_cost():
    cluster = FakeCluster(range(50061, 50070), replicas=0)
    backend = backend_of(cluster)
    launched = [await backend.start(LaunchSpec(f"i{n}", "default")) for n in range(3)]
    # Unmarked, the ReplicaSet would remove the newest (llmesh-target-3); the scaler chose the oldest.
    await backend.stop(launched[0], 1.0)
    assert cluster.deleted == ["llmesh-target-1"] and cluster.replicas == 2
    changes = [c for c in cluster.calls if c != "list_namespaced_pod"]  # the watcher lists pods meanwhile
    assert changes[-3:] == ["patch_namespaced_pod", "read_namespaced_deployment_scale",
                            "patch_namespaced_deployment_scale"]  # marked before replicas drop
    assert set(backend.claimed) == {"llmesh-target-2", "llmesh-target-3"}
    await backend.close(0)


async def test_a_pod_deleted_behind_the_scalers_back_is_reported_and_its_stop_still_lowers_replicas():
    cluster = FakeCluster(range(50061, 50070), replicas=0)
    backend = backend_of(cluster)
    a = await backend.start(LaunchSpec("a", "default"))
    b = await backend.start(LaunchSpec("b", "default"))
    assert backend.problem(a) is None
    del cluster.pods["llmesh-target-1"]  # evicted; the ReplicaSet would replace it
    cluster.replicas = 2
    await backend.refresh()
    assert backend.problem(a) == "pod llmesh-target-1 no longer exists" and backend.problem(b) is None
    await backend.stop(a, 1.0)  # 404 on the mark: already gone
    assert cluster.replicas == 1
    await backend.close(0)


async def test_a_pod_claimed_while_the_watcher_lists_is_not_taken_for_gone():
    import asyncio
    import threading

    cluster = FakeCluster(range(50061, 50070), replicas=0)
    backend = backend_of(cluster)
    a = await backend.start(LaunchSpec("a", "default"))
    real_list, taken, go = cluster.list_namespaced_pod, threading.Event(), threading.Event()

    def slow_list(*args, **kwargs):  # the watcher's listing, answered late
        listing = real_list(*args, **kwargs)
        taken.set()
        go.wait(10)
        return listing

    cluster.list_namespaced_pod = slow_list
    watching = asyncio.create_task(backend.refresh())
    await asyncio.to_thread(taken.wait, 10)
    cluster.list_namespaced_pod = real_list
    b = await backend.start(LaunchSpec("b", "default"))  # a new pod, absent from that listing
    go.set()
    await watching
    assert backend.problem(a) is None and backend.problem(b) is None


async def test_a_pool_without_its_deployment_and_api_errors_are_backend_errors_that_say_why():
    cluster = FakeCluster(range(50061, 50070), replicas=1)
    backend = backend_of(cluster)
    with pytest.raises(BackendError, match=f"0 Deployments labelled {POOL_LABEL}=batch in namespace llmesh"):
        await backend.start(LaunchSpec("x", "batch"))
    cluster.fail = ApiException(status=403, reason="Forbidden")
    with pytest.raises(BackendError, match=r"list_namespaced_deployment failed \(403\): Forbidden"):
        await backend.start(LaunchSpec("x", "default"))


async def test_a_pod_that_never_appears_fails_the_start_with_a_hint():
    cluster = FakeCluster(range(50061, 50070), replicas=0)
    cluster.hold = True  # e.g. no node has room
    backend = backend_of(cluster, pod_timeout_s=0.05)
    with pytest.raises(BackendError, match="no new pod appeared.*kubectl -n llmesh describe pods"):
        await backend.start(LaunchSpec("x", "default"))
    assert cluster.replicas == 1  # the ReplicaSet keeps trying; the next stop or start accounts for it


def test_the_scaler_says_why_without_a_cluster(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    assert main(["--backend", "kubernetes", "--port", "0"]) == 2
    assert "no Kubernetes API to talk to" in capsys.readouterr().err


# -- the scaler, end to end, on the fake cluster ----------------------------------------

async def test_the_scaler_scales_a_deployment_one_two_one_draining_the_chosen_pod_first():
    targets = [await FakeTarget(f"pod-{n}").start() for n in range(4)]
    router = await FakeRouter().start()
    cluster = FakeCluster([t.port for t in targets], replicas=1)
    backend = backend_of(cluster)
    values = {"port": 0, "router": router.address, "monitor": f"127.0.0.1:{free_port()}", "rpc_timeout_s": 1.0,
              "interval_s": 0.1, "start_timeout_s": 5.0, "warmup_tokens": 2, "stop_grace_s": 1.0,
              "metrics_window_s": 1.0, "panic_window_s": 0.5, "pools": ["default"], "backend": "kubernetes"}
    app = create_server(ScalerConfig.from_namespace(values, env={}), backend=backend)
    await app.start()
    channel = grpc.aio.insecure_channel(app.address)
    stub = scaler_pb2_grpc.ScalerStub(channel)
    try:
        # min_instances 1 under the default policy: the Deployment's first pod is adopted, not added to.
        await eventually(lambda: len(router.instances) == 1, what="the first pod registered")
        assert router.instances[0].spec.address == f"127.0.0.1:{targets[0].port}" and cluster.replicas == 1
        assert targets[0].generations  # warmed up before it was registered
        await stub.ScaleTo(scaler_pb2.ScaleToRequest(pool="default", instances=2))
        await eventually(lambda: len(router.instances) == 2, what="a second pod registered")
        assert cluster.replicas == 2
        second = next(i.spec.id for i in router.instances if i.spec.address.endswith(f":{targets[1].port}"))
        await stub.ScaleTo(scaler_pb2.ScaleToRequest(pool="default", instances=1))
        await eventually(lambda: cluster.replicas == 1, what="replicas lowered")
        assert len(cluster.deleted) == 1 and [i.spec.id for i in router.instances] != []
        gone = cluster.deleted[0]
        assert gone not in backend.claimed and len(backend.claimed) == 1
        kept = router.instances[0]
        assert kept.state == router_pb2.INSTANCE_STATE_ACTIVE
        history = (await stub.GetHistory(scaler_pb2.GetHistoryRequest(pool="default"))).events
        drained = [e for e in history if e.reason.startswith("draining ")]
        stopped = [e for e in history if e.reason.startswith("stopped ")]
        assert len(drained) == len(stopped) == 1 and drained[0].instance_id == stopped[0].instance_id
        assert drained[0].timestamp <= stopped[0].timestamp
        assert stopped[0].instance_id != kept.spec.id
        # The pod the ReplicaSet removed is the pod of the instance the scaler drained.
        started = next(e for e in history if e.instance_id == drained[0].instance_id and e.kind == "started")
        assert f"pod {gone} of deployment llmesh-target" in started.reason
        assert second in {drained[0].instance_id, kept.spec.id}
    finally:
        await channel.close()
        await app.stop(0)
        await router.stop()
        for t in targets:
            await t.stop()
