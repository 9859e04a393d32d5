"""The service's error tree; one handler turns each into an RFC 9457 problem."""

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

PROBLEM_BASE = "https://shapstream.dev/problems/"


@dataclass(frozen=True)
class FieldProblem:
    field: str
    reason: str


def retry_after(seconds: float) -> str:
    """A `Retry-After` value for a wait of about `seconds`: whole seconds, never 0 (RFC 9110
    section 10.2.3), spread over up to three times the wait. Clients told the same second all
    come back in it, and a gateway that just recovered sheds them again (seen in tests/faults)."""
    return str(max(1, math.ceil(seconds * random.uniform(1.0, 3.0))))


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

    def response_headers(self) -> Mapping[str, str]:
        return self.headers


class InvalidRequest(ServiceError):
    status, slug, title = 422, "invalid-request", "Invalid request"


class PayloadTooLarge(ServiceError):
    status, slug, title = 413, "payload-too-large", "Payload too large"


class DuplicateKey(ServiceError):
    """A key repeated within one JSON object: a parser would silently keep one of its values."""

    status, slug, title = 400, "duplicate-key", "Duplicate key"


class UnsupportedMediaType(ServiceError):
    """A body not declared as JSON (`Content-Type: application/json`) on a route that reads JSON."""

    status, slug, title = 415, "unsupported-media-type", "Unsupported media type"
    # RFC 9110 section 15.5.16: say which media types the resource accepts.
    headers: ClassVar[Mapping[str, str]] = MappingProxyType({"Accept-Post": "application/json"})


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
    """A dependency or the gateway itself cannot take the request now; retrying later can work."""

    status, slug, title = 503, "unavailable", "Service unavailable"

    def __init__(
        self,
        detail: str,
        errors: Sequence[FieldProblem] = (),
        extra: dict[str, Any] | None = None,
        retry_after_s: float = 1.0,
    ) -> None:
        super().__init__(detail, errors, extra)
        self.retry_after_s = retry_after_s

    def response_headers(self) -> Mapping[str, str]:
        return {**self.headers, "Retry-After": retry_after(self.retry_after_s)}

    def for_transaction(self, transaction_id: str) -> "Unavailable":
        """The same problem, naming the transaction the client should retry with."""
        again = type(self)(
            f"{self.detail} Retry with the same transaction_id; it is never decided twice.",
            self.errors,
            {**self.extra, "transaction_id": transaction_id},
            self.retry_after_s,
        )
        again.__cause__ = self.__cause__ or self
        return again


class BusUnavailable(Unavailable):
    """The bus did not acknowledge in time; a retry with the same transaction id is safe."""


class StoreUnavailable(Unavailable):
    """The explanation store did not answer."""


class Overloaded(Unavailable):
    """The gateway sheds a request rather than queue it (too many in flight, or too late)."""

    slug, title = "overloaded", "Overloaded"
