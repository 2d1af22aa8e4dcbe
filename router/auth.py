"""Optional bearer-token authentication of the Router RPCs (pure).

Clients send ``authorization: Bearer <token>`` metadata. Only the Router
service asks for it: ``grpc.health.v1``, reflection and ``Stats/Watch`` (load
figures the monitor subscribes to, no request content) stay open.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from services.common.errors import Unauthenticated

HEADER = "authorization"
SCHEME = "bearer"


class BearerAuth:
    """Checks a call's metadata against the configured token."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def check(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> None:
        """Raises Unauthenticated unless the metadata carries the token."""
        values = [v for k, v in (metadata or ()) if k == HEADER]
        if not values:
            raise Unauthenticated("missing `authorization: Bearer <token>` metadata")
        value = values[0].decode(errors="replace") if isinstance(values[0], bytes) else values[0]
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != SCHEME:
            raise Unauthenticated("the authorization metadata must be `Bearer <token>`")
        if not hmac.compare_digest(token.strip().encode(), self._token):
            raise Unauthenticated("invalid bearer token")
