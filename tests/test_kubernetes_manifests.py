"""deploy/kubernetes/, checked offline: every manifest against the Kubernetes schemas
(kubernetes-validate ships them), kustomize's own build where kubectl is installed, and
what the deployment promises (one exposed Service, gRPC probes, the scaler's RBAC is
exactly what its backend calls, the grace period covers the drain, flags each service accepts)."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from monitor.config import MonitorConfig
from router.config import RouterConfig
from scaler.backends import kubernetes as k8s_backend
from scaler.config import ScalerConfig
from services.draft.config import DraftConfig
from services.target.config import TargetConfig

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "deploy" / "kubernetes"
#: The oldest Kubernetes release the manifests promise (native gRPC probes are GA since 1.27)
#: and the newest the validator knows.
VERSIONS = ["1.29.0", kubernetes_validate.utils.latest_version()]
CONFIGS = {"router": RouterConfig, "target": TargetConfig, "draft": DraftConfig, "monitor": MonitorConfig,
           "scaler": ScalerConfig}


def kustomization() -> dict:
    return yaml.safe_load((BASE / "kustomization.yaml").read_text())


def resources() -> list[dict]:
    return [doc for name in kustomization()["resources"]
            for doc in yaml.safe_load_all((BASE / name).read_text()) if doc]


def of_kind(kind: str) -> dict[str, dict]:
    return {r["metadata"]["name"]: r for r in resources() if r["kind"] == kind}


def containers() -> dict[str, dict]:
    return {name: d["spec"]["template"]["spec"]["containers"][0] for name, d in of_kind("Deployment").items()}


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(version):
    docs = resources()
    assert {r["kind"] for r in docs} >= {"Namespace", "Deployment", "Service", "ServiceAccount", "Role",
                                         "RoleBinding", "PodDisruptionBudget", "PersistentVolumeClaim", "Job"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_rejects_what_the_api_server_would():
    """The schemas are really there offline: a wrong field type and an unknown field fail."""
    target = copy.deepcopy(of_kind("Deployment")["target"])
    target["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(target, VERSIONS[0], strict=True)
    role = copy.deepcopy(of_kind("Role")["llmesh-scaler"])
    role["rules"][0]["verb"] = ["list"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(role, VERSIONS[0], strict=True)


def test_kustomize_builds_every_resource_into_the_llmesh_namespace():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: kustomize's own build is not checked (the schemas still are)")
    run = subprocess.run([kubectl, "kustomize", str(BASE)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    built = [d for d in yaml.safe_load_all(run.stdout) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in built) == \
        sorted((d["kind"], d["metadata"]["name"]) for d in resources())
    for doc in built:
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "llmesh", doc["metadata"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "llmesh"
        kubernetes_validate.validate(doc, VERSIONS[0], strict=True)


def test_only_the_routers_service_is_reachable_from_outside():
    services = of_kind("Service")
    assert set(services) == {"router", "target", "draft", "monitor", "scaler"}
    exposed = {n for n, s in services.items() if s["spec"].get("type", "ClusterIP") != "ClusterIP"}
    assert exposed == {"router"} and services["router"]["spec"]["type"] == "LoadBalancer"
    assert services["target"]["spec"]["clusterIP"] == "None"  # headless: pod DNS names, no virtual IP


@pytest.mark.parametrize("name", ["router", "target", "draft", "monitor", "scaler"])
def test_each_service_is_probed_on_grpc_health_and_accepts_its_flags(name):
    container = containers()[name]
    args = container["args"]
    assert args[:2] == ["serve", name]
    port = int(flag(args, "--port"))
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["grpc"] == port
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": port}, probe
    CONFIGS[name].from_args(args[2:], env={})  # the service's own parser takes every flag (raises otherwise)


def test_the_model_services_wait_for_their_models_before_liveness_counts():
    for name in ("target", "draft"):
        spec = of_kind("Deployment")[name]["spec"]["template"]["spec"]
        startup = spec["containers"][0]["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # loading and warm-up
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] in of_kind("PersistentVolumeClaim")
        assert f"/data/models/{name}/config.json" in spec["initContainers"][0]["command"][-1]


def test_every_service_reads_the_admin_token_from_the_certs_secret():
    for name, d in of_kind("Deployment").items():
        spec = d["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["certs"]["secret"]["secretName"] == "llmesh-certs", name
        env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        assert env["LLMESH_ADMIN_TOKEN_FILE"] == "/certs/admin-token", name


def test_the_target_deployment_is_the_scaled_pool_and_its_pods_have_dns_names():
    target = of_kind("Deployment")["target"]
    scaler_args = containers()["scaler"]["args"]
    assert flag(scaler_args, "--backend") == "kubernetes"
    pool = target["metadata"]["labels"][k8s_backend.POOL_LABEL]
    assert pool in flag(scaler_args, "--pools").split(",")
    assert "replicas" not in target["spec"]  # the scaler owns it: a re-apply must not reset it
    template = target["spec"]["template"]
    assert target["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    headless = of_kind("Service")[template["spec"]["subdomain"]]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    assert headless["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    names = [p["name"] for p in template["spec"]["containers"][0]["ports"]]
    assert k8s_backend.PORT_NAME in names


def test_the_grace_period_covers_the_services_own_drain():
    for name, d in of_kind("Deployment").items():
        spec = d["spec"]["template"]["spec"]
        args = spec["containers"][0]["args"]
        drain = float(flag(args, "--grace-period-s")) if "--grace-period-s" in args else 10.0
        assert spec["terminationGracePeriodSeconds"] >= drain + 10, name


def test_a_disruption_budget_keeps_targets_serving_through_voluntary_evictions():
    (pdb,) = of_kind("PodDisruptionBudget").values()
    labels = of_kind("Deployment")["target"]["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1


# What each official-client call the backend makes needs: (API group, resource, verb).
CLIENT_CALLS = {
    "list_namespaced_deployment": ("apps", "deployments", "list"),
    "read_namespaced_deployment_scale": ("apps", "deployments/scale", "get"),
    "patch_namespaced_deployment_scale": ("apps", "deployments/scale", "patch"),
    "list_namespaced_pod": ("", "pods", "list"),
    "patch_namespaced_pod": ("", "pods", "patch"),
}


def test_the_scalers_role_grants_exactly_what_its_backend_calls():
    source = Path(k8s_backend.__file__).read_text()
    called = set(re.findall(r"self\.(?:apps|core)\.(\w+)", source))
    assert called <= set(CLIENT_CALLS), f"add the RBAC of {called - set(CLIENT_CALLS)} here and in the Role"
    needed = {CLIENT_CALLS[c] for c in called}
    role = of_kind("Role")["llmesh-scaler"]
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    assert granted == needed
    binding = of_kind("RoleBinding")["llmesh-scaler"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "llmesh-scaler"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "llmesh-scaler"}]
    assert not of_kind("ClusterRole") and not of_kind("ClusterRoleBinding")
    for name, d in of_kind("Deployment").items():
        spec = d["spec"]["template"]["spec"]
        if name == "scaler":
            assert spec["serviceAccountName"] == "llmesh-scaler"
        else:  # no other pod gets an API token
            assert spec["automountServiceAccountToken"] is False and "serviceAccountName" not in spec, name
