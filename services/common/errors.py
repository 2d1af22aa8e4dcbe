"""Domain errors shared by every service.

Pure Python: engines and policies raise these; each service maps them to gRPC
status codes in exactly one place (:mod:`services.common.status`).
"""

from __future__ import annotations


class LlmeshError(Exception):
    """Base of all domain errors. ``message`` is safe to show to a client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(LlmeshError):
    """A request field has a value the service cannot accept."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class OutOfRange(InvalidArgument):
    """A numeric field is outside what the model can serve (context, vocabulary)."""


class ResourceExhausted(LlmeshError):
    """The service is full; the caller should retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(LlmeshError):
    """The service (or every instance behind it) cannot serve right now."""


class NotFound(LlmeshError):
    """A named object (instance, pool) does not exist."""


class DeadlineExceeded(LlmeshError):
    """The request's deadline passed before it finished."""


class FailedPrecondition(LlmeshError):
    """The system is not in a state that allows the operation."""


class ModelFault(LlmeshError):
    """What the model computed for one sequence cannot be used (its scores
    are NaN or infinite): that sequence fails, the others go on."""


class Unauthenticated(LlmeshError):
    """The caller did not present valid credentials."""


class PermissionDenied(LlmeshError):
    """The caller is known but may not do this (e.g. a client calling an admin RPC)."""


class Relayed(LlmeshError):
    """A status another service returned, passed on unchanged: its code's
    name (e.g. "OUT_OF_RANGE"), details and trailing metadata (such as
    ``retry-after-ms``)."""

    def __init__(self, code: str, details: str, trailers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(details)
        self.code, self.details, self.trailers = code, details, trailers
