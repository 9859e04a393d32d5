"""The service's error tree; one handler turns each into an RFC 9457 problem."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

PROBLEM_BASE = "https://shapstream.dev/problems/"


@dataclass(frozen=True)
class FieldProblem:
    field: str
    reason: str


class ServiceError(Exception):
    """Base of every error a client may see; `detail` is written for the client."""

    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal error"
    # Response headers the client needs to act on the error (e.g. WWW-Authenticate).
    headers: ClassVar[Mapping[str, str]] = MappingProxyType({})

    def __init__(
        self,
        detail: str,
        errors: Sequence[FieldProblem] = (),
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = list(errors)
        self.extra = extra or {}


class InvalidRequest(ServiceError):
    status, slug, title = 422, "invalid-request", "Invalid request"


class PayloadTooLarge(ServiceError):
    status, slug, title = 413, "payload-too-large", "Payload too large"


class NotFound(ServiceError):
    status, slug, title = 404, "not-found", "Not found"


class Conflict(ServiceError):
    status, slug, title = 409, "conflict", "Conflict"


class Unauthorized(ServiceError):
    """No usable credential; the client may retry with a valid API key."""

    status, slug, title = 401, "unauthorized", "Unauthorized"
    # RFC 6750 section 3: a 401 names the scheme the client should use.
    headers: ClassVar[Mapping[str, str]] = MappingProxyType(
        {"WWW-Authenticate": 'Bearer realm="shapstream"'}
    )


class Forbidden(ServiceError):
    """A valid key without the scope the route needs."""

    status, slug, title = 403, "forbidden", "Forbidden"


class Unavailable(ServiceError):
    status, slug, title = 503, "unavailable", "Service unavailable"


class BusUnavailable(Unavailable):
    """The bus did not acknowledge in time; a retry with the same transaction id is safe."""


class StoreUnavailable(Unavailable):
    """The explanation store did not answer."""
