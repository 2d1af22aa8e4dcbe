"""TLS for every hop: server credentials, client channels, and when plaintext is allowed.

One :class:`TlsFiles` per process (its certificate, key and the CA that signs
llmesh services' certificates; `llmesh certs` makes a development set).
With it a server serves TLS, and, where the hop is service-to-service,
requires a client certificate signed by that CA (mutual TLS); the router's
public port asks clients only to trust the server (``tls_client_auth``
false there by default). Every client channel a process opens to another
service goes through one :class:`Channels` factory, which presents the same
certificate (so mTLS servers accept it) and checks the server's against the
CA.

Plaintext stays the default only on loopback: :func:`is_loopback` decides
which hosts are that; :class:`~services.common.config.BaseConfig` refuses a
non-loopback host without TLS unless ``--insecure`` is given.

Files are read once, when a process builds its credentials (``main()`` or a
test), never at import. grpc is imported only where credentials and channels
are made, so the CLI's parsers can use :class:`TlsFiles` without loading it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc

#: Environment variables a tool (healthcheck, the CLI) reads for its TLS files,
#: the same ones every service reads (``LLMESH_TLS_CERT`` is the ``tls_cert`` field's).
ENV_CERT, ENV_KEY, ENV_CA = "LLMESH_TLS_CERT", "LLMESH_TLS_KEY", "LLMESH_TLS_CA"


def is_loopback(host: str) -> bool:
    """True when ``host`` (an address or name to bind or reach) is this machine
    only: ``localhost``, 127.0.0.0/8, ``::1``. ``0.0.0.0``, ``::``, ``""`` and
    any other name are not."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class TlsFiles:
    """A process's PEM files: its certificate (chain), its private key, and the
    CA that signs llmesh services' certificates (the trust root for both
    directions). A client of the router's public port may have only the CA
    (``cert`` and ``key`` None); a server always has all three."""

    cert: Path | None
    key: Path | None
    ca: Path

    @classmethod
    def of(cls, cert: str | Path, key: str | Path, ca: str | Path, client_only: bool = False) -> "TlsFiles | None":
        """The files named (None when all three are empty). ValueError when
        only some are given (``client_only``: the CA alone is enough)."""
        given = [bool(str(p).strip()) for p in (cert, key, ca)]
        if not any(given):
            return None
        if client_only and given == [False, False, True]:
            return cls(None, None, Path(ca))
        if not all(given):
            raise ValueError("tls_cert, tls_key and tls_ca go together: give all three or none"
                             + (" (or only tls_ca, to reach the router's public port)" if client_only else ""))
        return cls(Path(cert), Path(key), Path(ca))

    @classmethod
    def from_env(cls, env: Mapping[str, str], client_only: bool = False) -> "TlsFiles | None":
        """From ``LLMESH_TLS_CERT``/``_KEY``/``_CA`` (None when unset)."""
        return cls.of(env.get(ENV_CERT, ""), env.get(ENV_KEY, ""), env.get(ENV_CA, ""), client_only)

    def problem(self, names: Sequence[str] = ("tls_cert", "tls_key", "tls_ca")) -> str | None:
        """Why these files cannot be used (one missing, unreadable or not PEM), or
        None; ``names``: what to call cert, key and CA (a config's fields, a tool's flags)."""
        for name, path in zip(names, (self.cert, self.key, self.ca)):
            if path is None:
                continue
            try:
                with open(path, "rb") as f:
                    head = f.read(64)
            except OSError as exc:
                return f"{name}: cannot read {path}: {exc.strerror or exc}"
            if b"-----BEGIN" not in head:
                return f"{name}: {path} is not a PEM file"
        return None

    def _read(self) -> tuple[bytes | None, bytes | None, bytes]:
        return (self.cert.read_bytes() if self.cert else None, self.key.read_bytes() if self.key else None,
                self.ca.read_bytes())

    def server_credentials(self, require_client_auth: bool) -> grpc.ServerCredentials:
        """Credentials for ``add_secure_port``: this certificate; with
        ``require_client_auth``, every client must present a certificate the
        CA signed (the handshake fails otherwise). OSError when a file cannot
        be read; ValueError without a certificate."""
        import grpc

        cert, key, ca = self._read()
        if cert is None or key is None:
            raise ValueError("a TLS server needs tls_cert and tls_key")
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                           require_client_auth=require_client_auth)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Client credentials: trust servers the CA signed, present this
        certificate to servers that ask for one. OSError when a file cannot
        be read."""
        import grpc

        cert, key, ca = self._read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


#: Large enough for dense draft distributions and long prompts.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class Channels:
    """Opens this process's client channels to other services: TLS with
    ``tls`` (None: plaintext), with the message-size limits every llmesh
    channel has. Credentials are built once, on first use. Any thread."""

    def __init__(self, tls: TlsFiles | None = None) -> None:
        self.tls = tls
        self._credentials: grpc.ChannelCredentials | None = None

    @property
    def secure(self) -> bool:
        return self.tls is not None

    def credentials(self) -> grpc.ChannelCredentials | None:
        if self.tls is not None and self._credentials is None:
            self._credentials = self.tls.channel_credentials()
        return self._credentials

    def open(self, address: str, provider=None, options: Sequence[tuple[str, object]] = ()) -> grpc.aio.Channel:
        """An aio channel to ``address`` ("host:port"); it propagates trace
        context when given a tracer provider; ``options`` add to (or override)
        the message-size limits. The event loop's thread."""
        import grpc

        # Imported here: container healthchecks import this module and should not load OpenTelemetry.
        from services.common import telemetry

        interceptors = telemetry.client_interceptors(provider) if provider is not None else None
        opts = [*CHANNEL_OPTIONS, *options]
        creds = self.credentials()
        if creds is None:
            return grpc.aio.insecure_channel(address, options=opts, interceptors=interceptors)
        return grpc.aio.secure_channel(address, creds, options=opts, interceptors=interceptors)

    def open_sync(self, address: str, options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
        """A blocking channel to ``address`` (tools: healthcheck, the CLI)."""
        import grpc

        opts = [*CHANNEL_OPTIONS, *options]
        creds = self.credentials()
        if creds is None:
            return grpc.insecure_channel(address, options=opts)
        return grpc.secure_channel(address, creds, options=opts)
