"""Who may call what: the admin boundary (every service) and the router's client token.

Admin RPCs (:data:`ADMIN_METHODS`) change what the fleet does: which
machines get the router's traffic, how many instances a pool has, how a
model service batches and speculates. They need an admin credential:

* the admin token (``--admin-token`` / ``LLMESH_ADMIN_TOKEN``), sent as
  ``authorization: Bearer <token>`` and compared in constant time; or
* the mutual-TLS identity of a llmesh service: on a server that requires
  client certificates (every service but the router's public port, see
  :mod:`services.common.tls`), a certificate the llmesh CA signed whose
  common name is one of ``--admin-identities`` (default ``scaler`` and
  ``cli``: the scaler registers and drains instances, the operator's CLI
  administers; the other services' certificates call no admin RPC).

When no admin token is configured and the server is plaintext on loopback
only (the default `llmesh up`), admin RPCs stay open, as before: whoever can
reach 127.0.0.1 runs the suite anyway. Anywhere else (TLS, a non-loopback
host) an admin RPC without one of the two credentials is refused.

Refusals: no credential at all, a malformed ``authorization`` header or a
token that matches nothing is UNAUTHENTICATED; a valid credential that does
not allow administration (the router's client token, a llmesh certificate
whose name is not an admin identity) is PERMISSION_DENIED.

The router's client token (``--auth-token``) guards every method of the
Router service; the admin token, an admin identity and (where client
certificates are required) any llmesh service certificate also pass it.
``grpc.health.v1``, reflection and ``Stats/Watch`` stay open.

One :class:`AccessInterceptor` per server applies :class:`Access`, whose
rules are pure.
"""

from __future__ import annotations

import hmac
import inspect
from collections.abc import Iterable

import grpc

from services.common.errors import PermissionDenied, Unauthenticated

HEADER = "authorization"
SCHEME = "bearer"

#: The admin RPCs of the contract, by full method name.
ADMIN_METHODS = frozenset({
    "/llmesh.v1.Router/RegisterInstance",
    "/llmesh.v1.Router/DrainInstance",
    "/llmesh.v1.Router/DeregisterInstance",
    "/llmesh.v1.Scaler/SetPolicy",
    "/llmesh.v1.Scaler/ScaleTo",
    "/llmesh.v1.TargetModel/Configure",
    "/llmesh.v1.DraftModel/Configure",
})

#: Certificate common names that may call admin RPCs unless configured otherwise.
DEFAULT_ADMIN_IDENTITIES = ("scaler", "cli")


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries ``token`` (none for an empty token)."""
    return ((HEADER, f"Bearer {token}"),) if token else ()


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The bearer token a call carries (None: no ``authorization`` header).
    Unauthenticated when the header is not ``Bearer <token>``."""
    values = [v for k, v in (metadata or ()) if k == HEADER]
    if not values:
        return None
    value = values[0].decode(errors="replace") if isinstance(values[0], bytes) else values[0]
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != SCHEME or not token.strip():
        raise Unauthenticated("the authorization metadata must be `Bearer <token>`")
    return token.strip()


class BearerAuth:
    """Checks a call's bearer token against one or more configured tokens
    (constant-time comparison of each)."""

    def __init__(self, *tokens: str) -> None:
        self._tokens = [t.encode() for t in tokens if t]

    def matches(self, token: str | None) -> bool:
        if token is None:
            return False
        given = token.encode()
        found = False
        for expected in self._tokens:  # no early exit: the time does not say which token matched
            found |= hmac.compare_digest(given, expected)
        return found

    def check(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> None:
        """Raises Unauthenticated unless the metadata carries one of the tokens."""
        token = bearer_token(metadata)
        if token is None:
            raise Unauthenticated("missing `authorization: Bearer <token>` metadata")
        if not self.matches(token):
            raise Unauthenticated("invalid bearer token")


def _short(method: str) -> str:
    return method.rsplit(".", 1)[-1]  # "/llmesh.v1.Router/RegisterInstance" -> "Router/RegisterInstance"


class Access:
    """The access rules of one server (pure).

    ``admin_token``: the admin credential (empty: none). ``admin_identities``:
    certificate common names allowed to administer (they only count where the
    transport verified a client certificate). ``admin_open``: admin RPCs need
    no credential (plaintext on loopback with no admin token).
    ``client_token``: the token every method under ``client_services`` (full
    service names) needs (empty: none).
    """

    def __init__(self, *, admin_token: str = "", admin_identities: Iterable[str] = DEFAULT_ADMIN_IDENTITIES,
                 admin_open: bool = False, client_token: str = "", client_services: Iterable[str] = ()) -> None:
        self.admin = BearerAuth(admin_token)
        self.has_admin_token = bool(admin_token)
        self.admin_identities = frozenset(admin_identities)
        self.admin_open = admin_open
        self.client = BearerAuth(client_token)
        self.client_prefixes = tuple(f"/{s}/" for s in client_services) if client_token else ()

    def guards(self, method: str) -> bool:
        """Whether calls of ``method`` are checked at all."""
        return (method in ADMIN_METHODS and not self.admin_open) or method.startswith(self.client_prefixes)

    def check(self, method: str, metadata: Iterable[tuple[str, str | bytes]] | None,
              identity: str | None = None, certificates: bool = False) -> None:
        """Allows the call or raises Unauthenticated / PermissionDenied.

        ``method``: the full method name; ``metadata``: the call's metadata;
        ``identity``: the common name of the client certificate the transport
        verified (None: no verified certificate); ``certificates``: whether
        this port asks clients for certificates at all (the refusal says only
        what can work on it).
        """
        need_admin = method in ADMIN_METHODS and not self.admin_open
        need_client = method.startswith(self.client_prefixes)
        if not need_admin and not need_client:
            return
        token = bearer_token(metadata)
        token_is_admin = self.admin.matches(token)
        if token is not None and not token_is_admin and not self.client.matches(token):
            raise Unauthenticated("invalid bearer token")  # whatever else the call carries
        if token_is_admin or (identity is not None and identity in self.admin_identities):
            return
        if need_admin:
            if token is None and identity is None:
                how = ("send `authorization: Bearer <admin token>` (the token the service was given with "
                       "--admin-token / LLMESH_ADMIN_TOKEN)")
                if certificates:
                    how += " or call with an admin llmesh certificate" + (
                        "" if self.has_admin_token else " (this service has no admin token: only certificates can)")
                elif not self.has_admin_token:
                    how += " (this service was given none: start it with --admin-token)"
                raise Unauthenticated(f"{_short(method)} is an admin RPC: {how}")
            who = "the client token" if token is not None else f"the certificate of {identity!r}"
            raise PermissionDenied(
                f"{_short(method)} is an admin RPC and {who} does not allow administration: use the admin token"
                f" or a certificate named one of: {', '.join(sorted(self.admin_identities)) or 'none'}")
        if token is None and identity is None:  # a client token or a llmesh certificate passes
            raise Unauthenticated("missing `authorization: Bearer <token>` metadata")


def peer_identity(context: grpc.aio.ServicerContext) -> str | None:
    """The common name of the client certificate the transport verified (None: none)."""
    names = (context.auth_context() or {}).get("x509_common_name") or ()
    return names[0].decode(errors="replace") if names else None


def _guarded(behavior, check):
    if inspect.isasyncgenfunction(behavior):
        async def guarded_stream(request, context):
            check(context)
            async for response in behavior(request, context):
                yield response

        return guarded_stream

    async def guarded(request, context):
        check(context)
        return await behavior(request, context)

    return guarded


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Applies ``access`` to every call before its handler runs. Must sit inside
    the error interceptor (later in the server's list) so that its refusals
    become status codes there. ``verified_peers``: the server requires client
    certificates, so a certificate's name is an identity."""

    def __init__(self, access: Access, verified_peers: bool) -> None:
        self.access = access
        self.verified_peers = verified_peers

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not self.access.guards(method):
            return handler

        def check(context) -> None:
            identity = peer_identity(context) if self.verified_peers else None
            self.access.check(method, context.invocation_metadata(), identity, certificates=self.verified_peers)

        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                return handler._replace(**{kind: _guarded(behavior, check)})
        return handler
