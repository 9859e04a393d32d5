"""API-key authentication and scope checks for routes, and recording reads in the access log.

Routes declare what they need as a parameter:

    caller: Annotated[Caller, require_scope(Scope.EXPLANATIONS_READ)]

and record what they disclose with `await record_access(state, caller, Action..., target)`.
Keys arrive as `Authorization: Bearer KEY`; only their SHA-256 is looked up, and neither a
key nor its hash is ever logged (a key's name at most). Refused requests (401, 403) are
noted for the access log with the key's name when it is known (`note_denial`).

An oversized body gets its 413 from the middleware before the key is checked, which discloses
nothing; every other request without a valid key gets the 401 (POST /v1/predictions parses
its body only after its dependencies, the key check among them).
"""

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends
from fastapi.security import HTTPBearer
from starlette.requests import HTTPConnection

from service.api.deps import STATE_KEY, AppState
from service.core.access import NO_VALID_KEY, AccessEntry, Action, Scope, to_millis
from service.core.denials import Attempt, request_line
from service.errors import Forbidden, Unauthorized

SCHEME_DESCRIPTION = (
    "An API key from `shapstream keys create`, sent as `Authorization: Bearer KEY`."
)


@dataclass(frozen=True, slots=True)
class Caller:
    """Whoever presented a valid key: its name and scopes, never the key."""

    name: str
    scopes: frozenset[Scope]


class ApiKeyAuth(HTTPBearer):
    """Reads the bearer key, verifies it and checks one scope (None: any valid key will do).

    One dependency, not a chain (header, then key, then scope): FastAPI solves each dependency
    of a request separately, some 10 us apiece on POST /v1/predictions. Being an `HTTPBearer`,
    it declares the scheme in the OpenAPI document. auto_error=False: a missing or malformed
    header gets this service's 401 problem+json, not FastAPI's own answer.
    """

    def __init__(self, scope: Scope | None) -> None:
        super().__init__(auto_error=False, scheme_name="ApiKey", description=SCHEME_DESCRIPTION)
        self.scope = scope

    # Returns the caller rather than the raw credentials, hence the override's other type.
    async def __call__(self, request: HTTPConnection) -> Caller:  # type: ignore[override]
        return await authorize(request, self.scope)


async def authorize(connection: HTTPConnection, scope: Scope | None) -> Caller:
    """The caller of a request whose key is valid and holds `scope`; 401 or 403 otherwise.

    Called directly, without the dependency, by the hot path (POST /v1/predictions), which
    declares its security in the OpenAPI document itself (`SECURITY`).
    """
    scheme, _, key = connection.headers.get("authorization", "").partition(" ")
    state = getattr(connection.state, STATE_KEY)
    assert isinstance(state, AppState)
    if scheme.lower() != "bearer" or not key:
        note_denial(state, connection, Action.DENIED_UNAUTHENTICATED, NO_VALID_KEY, "no key")
        raise Unauthorized("Send an API key as 'Authorization: Bearer KEY'.")
    stored = await state.keys.verify(key)
    if stored is None:
        note_denial(state, connection, Action.DENIED_UNAUTHENTICATED, NO_VALID_KEY, "unknown key")
        raise Unauthorized("The API key is not valid.")
    if scope is not None and scope not in stored.scopes:
        note_denial(state, connection, Action.DENIED_FORBIDDEN, stored.name, f"lacks {scope}")
        raise Forbidden(
            f"The API key {stored.name!r} lacks the scope {scope.value!r}.",
            extra={"missing_scope": scope.value},
        )
    return Caller(stored.name, stored.scopes)


def note_denial(
    state: AppState, connection: HTTPConnection, action: Action, key_name: str, reason: str = ""
) -> None:
    """Note a refused request for the access log: no I/O here, written within a second or so
    in a bounded batch (service/core/denials.py), so a flood of bad keys stays cheap."""
    method = connection.scope.get("method", "GET")
    client = connection.client.host if connection.client is not None else "unknown"
    request = request_line(method, connection.url.path)
    state.denials.note(Attempt(action, key_name, request, client, reason))


def require_scope(scope: Scope | None) -> Any:
    """A dependency giving the `Caller`; 401 without a valid key, 403 without `scope`."""
    return Depends(ApiKeyAuth(scope))


# Any valid key, whatever its scopes.
AnyCaller = Annotated[Caller, require_scope(None)]
Predictor = Annotated[Caller, require_scope(Scope.PREDICT)]
ExplanationReader = Annotated[Caller, require_scope(Scope.EXPLANATIONS_READ)]
AuditExporter = Annotated[Caller, require_scope(Scope.AUDIT_EXPORT)]


async def record_access(state: AppState, caller: Caller, action: Action, target: str) -> None:
    """Append to the access log; raises if the store fails, so nothing is disclosed unlogged."""
    at = to_millis(datetime.now(UTC))
    entry = AccessEntry(at=at, key_name=caller.name, action=action, target=target)
    await state.access.record(entry)


# The OpenAPI security requirement of a route that calls `authorize` itself.
SECURITY: list[dict[str, list[str]]] = [{"ApiKey": []}]

# For the OpenAPI document of protected routes.
UNAUTHORIZED_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "no API key, or not a valid one"},
}
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    **UNAUTHORIZED_RESPONSES,
    403: {"description": "the API key lacks the scope this route needs"},
}
