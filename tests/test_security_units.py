"""Security without a network: the access rules, `llmesh certs` output, the
TLS config fields, and how `llmesh up --tls` hands certificates to each process."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from services.cli.certs import NAMES, files, make_certs, read_admin_token
from services.cli.launcher import options_of, preflight
from services.cli.main import build_parser
from services.cli.main import main as llmesh
from services.common.access import ADMIN_METHODS, Access, BearerAuth, bearer_metadata
from services.common.config import BaseConfig, ConfigError
from services.common.errors import PermissionDenied, Unauthenticated
from services.common.server import access_of
from services.common.stubs import model_pb2, router_pb2, scaler_pb2
from services.common.suite import UpOptions, plan
from services.common.tls import TlsFiles, is_loopback
from services.target.config import TargetConfig

REGISTER = "/llmesh.v1.Router/RegisterInstance"
GENERATE = "/llmesh.v1.Router/Generate"
LIST = "/llmesh.v1.Router/ListInstances"
CONFIGURE = "/llmesh.v1.TargetModel/Configure"
TARGET_GENERATE = "/llmesh.v1.TargetModel/Generate"


def bearer(token: str):
    return list(bearer_metadata(token))


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("home") / "certs"
    make_certs(directory, hosts=["llmesh.example", "10.1.2.3"])
    return directory


# -- the access rules ------------------------------------------------------------
def test_admin_methods_are_the_contracts_admin_rpcs():
    full = {f"/{s.full_name}/{m.name}" for module in (router_pb2, scaler_pb2, model_pb2)
            for s in module.DESCRIPTOR.services_by_name.values() for m in s.methods}
    assert ADMIN_METHODS <= full
    assert {m.rsplit("/", 1)[1] for m in ADMIN_METHODS} == {
        "RegisterInstance", "DrainInstance", "DeregisterInstance", "SetPolicy", "ScaleTo", "Configure"}
    assert "/llmesh.v1.TargetModel/Configure" in ADMIN_METHODS and "/llmesh.v1.DraftModel/Configure" in ADMIN_METHODS


def test_admin_rpcs_need_the_admin_token_and_other_rpcs_do_not():
    access = Access(admin_token="adm1n")
    for method in ADMIN_METHODS:
        access.check(method, bearer("adm1n"))
        for metadata in (None, []):
            with pytest.raises(Unauthenticated, match="admin RPC"):
                access.check(method, metadata)
        for metadata in (bearer("wrong"), [("authorization", "adm1n")], [("authorization", "Basic adm1n")],
                         [("authorization", "Bearer ")]):
            with pytest.raises(Unauthenticated):
                access.check(method, metadata)
    for method in (GENERATE, LIST, TARGET_GENERATE, "/llmesh.v1.Stats/Watch", "/grpc.health.v1.Health/Check"):
        access.check(method, None)
        access.check(method, bearer("anything"))


def test_a_valid_credential_that_may_not_administer_is_permission_denied():
    access = Access(admin_token="adm1n", client_token="c", client_services=["llmesh.v1.Router"],
                    admin_identities=["scaler", "cli"])
    with pytest.raises(PermissionDenied, match="client token"):
        access.check(REGISTER, bearer("c"))
    with pytest.raises(PermissionDenied, match="'router'"):
        access.check(CONFIGURE, None, identity="router")
    access.check(CONFIGURE, None, identity="scaler")
    access.check(REGISTER, None, identity="cli")
    access.check(REGISTER, bearer("adm1n"))


def test_the_client_token_guards_the_router_only_and_admin_credentials_pass_it():
    access = Access(admin_token="adm1n", client_token="c", client_services=["llmesh.v1.Router"])
    for method in (GENERATE, LIST):
        access.check(method, bearer("c"))
        access.check(method, bearer("adm1n"))
        access.check(method, None, identity="monitor")  # a verified llmesh certificate is a client too
        for metadata in (None, bearer("wrong")):
            with pytest.raises(Unauthenticated):
                access.check(method, metadata)
    access.check("/llmesh.v1.Stats/Watch", None)


def test_admin_is_open_only_on_plaintext_loopback_without_a_token(certs):
    def admin_open(**values) -> bool:
        return access_of(BaseConfig.from_namespace(values, env={})).admin_open

    tls = {"tls_cert": str(certs / "router.crt"), "tls_key": str(certs / "router.key"), "tls_ca": str(certs / "ca.crt")}
    assert admin_open() and admin_open(host="localhost") and admin_open(host="::1")
    assert not admin_open(admin_token="t")
    assert not admin_open(host="0.0.0.0", insecure=True)
    assert not admin_open(**tls)
    assert not admin_open(host="0.0.0.0", **tls)
    open_access = access_of(BaseConfig.from_namespace({}, env={}))
    for method in ADMIN_METHODS:
        open_access.check(method, None)


def test_bearer_auth_compares_every_token():
    auth = BearerAuth("one", "two")
    auth.check(bearer("one"))
    auth.check(bearer("two"))
    assert not auth.matches(None) and not auth.matches("three") and not BearerAuth().matches("")
    with pytest.raises(Unauthenticated):
        auth.check(bearer("three"))


# -- config: plaintext only on loopback ------------------------------------------
def test_a_non_loopback_host_without_tls_refuses_to_start_unless_insecure(certs):
    for host in ("0.0.0.0", "::", "10.0.0.5", "example.com", ""):
        with pytest.raises(ConfigError, match="--insecure"):
            BaseConfig.from_namespace({"host": host}, env={})
        assert BaseConfig.from_namespace({"host": host, "insecure": True}, env={}).insecure
    assert BaseConfig.from_namespace({"host": "0.0.0.0"}, env={"LLMESH_INSECURE": "1"}).insecure
    f = files(certs, "target")
    config = BaseConfig.from_namespace({"host": "0.0.0.0", "tls_cert": str(f.cert), "tls_key": str(f.key),
                                        "tls_ca": str(f.ca)}, env={})
    assert config.tls() == f
    assert [is_loopback(h) for h in ("127.0.0.1", "127.3.4.5", "localhost", "[::1]", "0.0.0.0", "::", "")] == [
        True, True, True, True, False, False, False]


def test_tls_files_go_together_and_must_be_readable_pem(certs, tmp_path):
    f = files(certs, "target")
    with pytest.raises(ConfigError, match="go together"):
        BaseConfig.from_namespace({"tls_cert": str(f.cert), "tls_key": str(f.key)}, env={})
    with pytest.raises(ConfigError, match="tls_key: cannot read"):
        BaseConfig.from_namespace({"tls_cert": str(f.cert), "tls_key": str(tmp_path / "none"),
                                   "tls_ca": str(f.ca)}, env={})
    (tmp_path / "junk").write_text("not a certificate")
    with pytest.raises(ConfigError, match="tls_ca: .* is not a PEM file"):
        BaseConfig.from_namespace({"tls_cert": str(f.cert), "tls_key": str(f.key),
                                   "tls_ca": str(tmp_path / "junk")}, env={})


def test_tls_fields_come_from_the_environment_the_services_own_first(certs):
    env = {"LLMESH_TLS_CERT": str(certs / "scaler.crt"), "LLMESH_TLS_KEY": str(certs / "scaler.key"),
           "LLMESH_TLS_CA": str(certs / "ca.crt"), "LLMESH_TARGET_TLS_CERT": str(certs / "target.crt"),
           "LLMESH_TARGET_TLS_KEY": str(certs / "target.key"), "LLMESH_ADMIN_TOKEN": "adm1n"}
    config = TargetConfig.from_namespace({"port": 0}, env=env)
    assert config.tls() == files(certs, "target") and config.admin_token == "adm1n"
    assert config.tls_client_auth is True


# -- llmesh certs -----------------------------------------------------------------
def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_certs_parse_chain_to_the_ca_and_name_each_service(certs):
    ca = load(certs / "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    store = Store([ca])
    for name in NAMES:
        cert = load(certs / f"{name}.crt")
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert ExtendedKeyUsageOID.SERVER_AUTH in usage and ExtendedKeyUsageOID.CLIENT_AUTH in usage
        for host in (name, "localhost", "llmesh.example"):
            PolicyBuilder().store(store).build_server_verifier(x509.DNSName(host)).verify(cert, [])
        for ip in ("127.0.0.1", "10.1.2.3"):
            import ipaddress

            PolicyBuilder().store(store).build_server_verifier(
                x509.IPAddress(ipaddress.ip_address(ip))).verify(cert, [])
        PolicyBuilder().store(store).build_client_verifier().verify(cert, [])
        with pytest.raises(VerificationError):
            PolicyBuilder().store(store).build_server_verifier(x509.DNSName("elsewhere.example")).verify(cert, [])


def test_certs_keys_and_token_are_private_and_a_second_run_keeps_everything(certs):
    assert stat.S_IMODE(certs.stat().st_mode) == 0o700
    for path in [certs / "ca.key", certs / "admin-token", *(certs / f"{n}.key" for n in NAMES)]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert len(read_admin_token(certs)) >= 32
    before = {p.name: p.read_bytes() for p in certs.iterdir()}
    assert make_certs(certs) == []
    assert {p.name: p.read_bytes() for p in certs.iterdir()} == before


def test_certs_of_another_ca_do_not_chain(certs, tmp_path):
    other = tmp_path / "other"
    make_certs(other, names=("router",))
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([load(certs / "ca.crt")])).build_client_verifier().verify(
            load(other / "router.crt"), [])


def test_llmesh_certs_writes_a_set_into_the_chosen_dir(tmp_path, capsys):
    assert llmesh(["certs", "--dir", str(tmp_path / "c"), "--days", "2"]) == 0
    assert {f"{n}.{ext}" for n in NAMES for ext in ("crt", "key")} | {"ca.crt", "ca.key", "admin-token"} == {
        p.name for p in (tmp_path / "c").iterdir()}
    assert "wrote" in capsys.readouterr().out
    assert llmesh(["certs", "--dir", str(tmp_path / "c")]) == 0
    assert "already holds" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad_days:  # a usage error: argparse names the flag
        llmesh(["certs", "--dir", str(tmp_path / "d"), "--days", "0"])
    assert bad_days.value.code == 2 and "argument --days" in capsys.readouterr().err


# -- llmesh up --tls ----------------------------------------------------------------
def test_up_with_tls_gives_each_process_its_own_certificate_and_the_admin_token(tmp_path):
    certs = tmp_path / "certs"
    specs = {s.name: s for s in plan(UpOptions(home=tmp_path, tls_dir=certs, admin_token="adm1n"), cpus=2)}
    for name, spec in specs.items():
        assert spec.env["LLMESH_TLS_CERT"] == str(certs / f"{name}.crt")
        assert spec.env[f"LLMESH_{name.upper()}_TLS_KEY"] == str(certs / f"{name}.key")
        assert spec.env["LLMESH_TLS_CA"] == str(certs / "ca.crt")
        assert spec.env["LLMESH_ADMIN_TOKEN"] == "adm1n"
        assert "--insecure" not in spec.args
    # the targets the scaler starts inherit its environment and take the target's certificate
    assert specs["scaler"].env["LLMESH_TARGET_TLS_CERT"] == str(certs / "target.crt")
    plain = {s.name: s for s in plan(UpOptions(home=tmp_path), cpus=2)}
    assert not any("TLS" in k or "ADMIN" in k for s in plain.values() for k in s.env)


def test_up_refuses_plaintext_on_a_non_loopback_host_unless_asked(tmp_path):
    def problem(*argv) -> str | None:
        return preflight(options_of(build_parser().parse_args(["up", "--home", str(tmp_path), *argv])))

    assert "--tls" in problem("--host", "0.0.0.0") and "--insecure" in problem("--host", "0.0.0.0")
    for argv in (("--host", "0.0.0.0", "--insecure"), ("--host", "0.0.0.0", "--tls"), ()):
        assert "reachable from other machines" not in (problem(*argv) or "")  # (models are missing here)
    specs = plan(options_of(build_parser().parse_args(["up", "--host", "0.0.0.0", "--insecure"])), cpus=2)
    assert all("--insecure" in s.args for s in specs)
    router = next(s for s in specs if s.name == "router")
    assert router.args[router.args.index("--targets") + 1].startswith("127.0.0.1:")


def test_tls_files_from_env():
    assert TlsFiles.from_env({}) is None
    with pytest.raises(ValueError, match="go together"):
        TlsFiles.from_env({"LLMESH_TLS_CA": "/x"})


def test_compose_gives_every_service_its_certificate_from_a_one_shot_certs_service():
    import yaml

    compose = yaml.safe_load((Path(__file__).resolve().parents[1] / "docker-compose.yml").read_text())
    services = compose["services"]
    # *.llmesh.internal: the network aliases of the targets the scaler's docker backend starts
    assert services["certs"]["command"] == ["certs", "--dir", "/certs", "--host", "*.llmesh.internal"]
    assert services["certs"]["restart"] == "no"
    assert "certs" in compose["volumes"]
    for name in ("router", "target", "draft", "monitor", "scaler"):
        env, service = services[name]["environment"], services[name]
        assert (env["LLMESH_TLS_CERT"], env["LLMESH_TLS_KEY"]) == (f"/certs/{name}.crt", f"/certs/{name}.key")
        assert env["LLMESH_TLS_CA"] == "/certs/ca.crt" and env["LLMESH_ADMIN_TOKEN_FILE"] == "/certs/admin-token"
        assert "certs:/certs:ro" in service["volumes"]
        assert name in NAMES  # `llmesh certs` issues it, valid for the compose host name
        needs = service["depends_on"]
        assert needs.get("certs", {}).get("condition") == "service_completed_successfully" or \
            all(needs[d]["condition"] == "service_healthy" for d in needs)  # or after one that waited for it
