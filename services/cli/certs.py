"""`llmesh certs`: a development CA, one certificate per service, and an admin token.

Writes under ``$LLMESH_HOME/certs`` (``--dir`` to choose), the directory
mode 0700, every private key and the token 0600:

* ``ca.crt``/``ca.key``: the CA (ECDSA P-256, ten years), the trust root
  every service and client is given with ``--tls-ca``;
* ``NAME.crt``/``NAME.key`` for each service (router, target, draft,
  monitor, scaler) and for ``cli`` (the operator's `llmesh` commands): common
  name NAME, usable as server and client (mutual TLS), valid for
  ``localhost``, ``127.0.0.1``, ``::1``, NAME (the compose host name) and
  every ``--host`` given;
* ``admin-token``: a random admin credential (`llmesh up --tls` gives it to
  every service as ``LLMESH_ADMIN_TOKEN``).

Files that exist are kept (``--force`` makes all anew): running it twice
changes nothing, and a missing certificate is issued by the existing CA;
with ``--host`` every certificate is issued again (same CA) with those names.
Development use: the CA key sits next to the certificates it signs.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import secrets
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from services.cli import argtypes
from services.common.paths import default_home
from services.common.tls import ENV_CA, ENV_CERT, ENV_KEY, TlsFiles

#: The certificates `llmesh certs` issues: the five services and the CLI.
NAMES = ("router", "target", "draft", "monitor", "scaler", "cli")
CA_DAYS = 3650
ADMIN_TOKEN_FILE = "admin-token"


def default_dir(home: Path | None = None) -> Path:
    """``HOME/certs`` (HOME: ``$LLMESH_HOME`` or ``~/.cache/llmesh``)."""
    return (home or default_home()) / "certs"


def files(directory: Path, name: str) -> TlsFiles:
    """The TLS files of certificate ``name`` in ``directory`` (with the CA)."""
    return TlsFiles(directory / f"{name}.crt", directory / f"{name}.key", directory / "ca.crt")


def _write(path: Path, data: bytes, mode: int) -> None:
    """Writes ``data`` to a new file created with ``mode`` (no window where a key is readable)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _san(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host)


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "llmesh"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _new_ca(directory: Path, now: datetime.datetime):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("llmesh development CA")
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write(directory / "ca.key", _key_pem(key), 0o600)
    _write(directory / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert, key


def _load_ca(directory: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    return cert, key


def _issue(directory: Path, name: str, hosts: Sequence[str], days: int, ca_cert, ca_key,
           now: datetime.datetime) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = ec.generate_private_key(ec.SECP256R1())
    sans = list(dict.fromkeys([name, "localhost", "127.0.0.1", "::1", *hosts]))
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in sans]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write(directory / f"{name}.key", _key_pem(key), 0o600)
    _write(directory / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)


def make_certs(directory: Path, hosts: Iterable[str] = (), days: int = 365, force: bool = False,
               names: Sequence[str] = NAMES) -> list[Path]:
    """Makes what is missing in ``directory`` (everything with ``force``): the
    CA, a certificate per name, the admin token. Returns the files written.
    ValueError for a bad ``days``; OSError when the directory is not writable."""
    if days < 1:
        raise ValueError(f"days: must be >= 1, got {days}")
    hosts = [h.strip() for h in hosts if h.strip()]
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    now = datetime.datetime.now(datetime.timezone.utc)
    written: list[Path] = []
    if force or not ((directory / "ca.crt").is_file() and (directory / "ca.key").is_file()):
        ca_cert, ca_key = _new_ca(directory, now)
        written += [directory / "ca.crt", directory / "ca.key"]
        force = True  # certificates of an older CA no longer chain
    else:
        ca_cert, ca_key = _load_ca(directory)
    for name in names:
        f = files(directory, name)
        if force or hosts or not (f.cert.is_file() and f.key.is_file()):
            _issue(directory, name, hosts, days, ca_cert, ca_key, now)
            written += [f.cert, f.key]
    token = directory / ADMIN_TOKEN_FILE
    if force or not token.is_file():
        _write(token, (secrets.token_urlsafe(32) + "\n").encode(), 0o600)
        written.append(token)
    return written


def read_admin_token(directory: Path) -> str:
    """The admin token ``make_certs`` wrote ("" when there is none)."""
    try:
        return (directory / ADMIN_TOKEN_FILE).read_text().strip()
    except FileNotFoundError:
        return ""


# -- client flags shared by the commands that call services -------------------------------
def add_client_tls_arguments(p: argparse.ArgumentParser) -> None:
    """``--tls`` and ``--tls-cert/--tls-key/--tls-ca`` (defaults: ``$LLMESH_TLS_*``)."""
    p.add_argument("--tls", action="store_true",
                   help="connect over TLS with the certificates of `llmesh certs` (HOME/certs: ca.crt, cli.crt)")
    for flag, var in (("--tls-cert", ENV_CERT), ("--tls-key", ENV_KEY), ("--tls-ca", ENV_CA)):
        p.add_argument(flag, default=os.environ.get(var, ""),
                       help=f"TLS file (PEM) instead of HOME/certs' (default: ${var}); the CA alone reaches the "
                            "router's public port")


def client_tls(args: argparse.Namespace) -> TlsFiles | None:
    """The TLS files the client flags name (None: plaintext). ValueError, naming
    the flag, when only some are given or one cannot be read as PEM: checked
    here, since gRPC reads them only when a channel opens."""
    given = TlsFiles.of(args.tls_cert, args.tls_key, args.tls_ca, client_only=True)
    if given is not None:
        problem = given.problem(("--tls-cert", "--tls-key", "--tls-ca"))
        if problem:
            raise ValueError(problem)
        return given
    if not args.tls:
        return None
    made = files(default_dir(), "cli")
    problem = made.problem(("--tls", "--tls", "--tls"))
    if problem:
        raise ValueError(f"{problem} (make them with `llmesh certs`, or give --tls-ca, with --tls-cert and "
                         f"--tls-key where the server asks for a client certificate)")
    return made


def run(args: argparse.Namespace) -> int:
    directory = Path(args.dir) if args.dir else default_dir(Path(args.home) if args.home else None)
    try:
        written = make_certs(directory, args.host or (), args.days, args.force)
    except (ValueError, OSError) as exc:
        print(f"llmesh certs: {exc}", file=sys.stderr)
        return 1
    if written:
        print(f"llmesh certs: wrote {len(written)} file(s) in {directory}: "
              + ", ".join(p.name for p in written))
    else:
        print(f"llmesh certs: {directory} already holds the CA, {', '.join(NAMES)} and the admin token "
              "(--force makes new ones)")
    print(f"  a service: --tls-cert {directory}/NAME.crt --tls-key {directory}/NAME.key --tls-ca {directory}/ca.crt")
    print("  the suite: llmesh up --tls   clients: llmesh generate --tls ...")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "certs", help="make a development CA and TLS certificates for every service",
        description="Makes a development CA, one server+client certificate per service (router, target, draft, "
                    "monitor, scaler) and one for the CLI, and an admin token, under HOME/certs. Keys are "
                    "written with mode 0600. Existing files are kept unless --force.")
    p.add_argument("--dir", help="where to write (default: HOME/certs)")
    p.add_argument("--home", help="llmesh home (default: $LLMESH_HOME or ~/.cache/llmesh)")
    p.add_argument("--host", action="append", metavar="HOST",
                   help="another name or address every certificate is valid for (repeatable), e.g. the "
                        "machine's own")
    p.add_argument("--days", type=argtypes.int_in(1, 36500), default=365, help="validity of the certificates (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="make a new CA and new certificates and token")
    p.set_defaults(func=run)
    return p
