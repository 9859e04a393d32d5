"""Pure ASGI middleware (cheaper than BaseHTTPMiddleware on the hot path)."""

import time

from starlette.exceptions import HTTPException
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.problems import problem_response
from service.errors import retry_after
from service.metrics import Metrics


class BodyLimit:
    """Refuse bodies over `max_bytes` with a 413 problem, whether announced or streamed.

    Starlette's own limiter answers in plain text; every error here is problem+json.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge(self.max_bytes)
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"The request body is larger than {self.max_bytes} bytes."
        response = problem_response(413, "payload-too-large", "Payload too large", detail)
        await response(scope, receive, send)


class _TooLarge(HTTPException):
    # An HTTPException: FastAPI turns any other error raised while reading a body into a 400.
    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"The request body is larger than {max_bytes} bytes.")


# Set in the scope of a request taken up while the gateway is busy (a quarter of its bound in
# flight): requests may have waited their turn, so their client may have gone meanwhile.
BUSY = "shapstream.busy"
# When the request reached the gateway (time.monotonic()): its deadline counts from there,
# time spent waiting for its turn, its body and its key check included.
ARRIVED = "shapstream.arrived"
# Seconds a request spent waiting because its client asked it to (GET /v1/explanations?wait=S,
# for the worker to write the explanation): measured apart, and left out of its latency.
WAITED = "shapstream.waited"


class LoadShedding:
    """Bound the requests under /v1/ served at once; above the bound, answer 503 at once.

    Queueing past the bound would only make every request late: the SRE book's "Handling
    Overload" advice, and what stops a stall of a dependency from turning into minutes of
    queued work once it is over. Health, readiness and metrics are never shed.
    """

    def __init__(self, app: ASGIApp, max_in_flight: int, metrics: Metrics) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.metrics = metrics
        self.in_flight = 0
        metrics.in_flight.set_function(lambda: self.in_flight)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            self.metrics.shed.labels(reason="overload").inc()
            detail = f"The gateway is serving {self.max_in_flight} requests already."
            response = problem_response(
                503, "overloaded", "Overloaded", detail, headers={"Retry-After": retry_after(1.0)}
            )
            await response(scope, receive, send)
            return
        scope[ARRIVED] = time.monotonic()
        self.in_flight += 1
        if self.in_flight > self.max_in_flight // 4:
            scope[BUSY] = True
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class RequestMetrics:
    """Count and time requests by route template (never by raw path: unbounded labels).

    The time is the service's: a wait the client asked for (`WAITED`) is not in it.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        # Templates of the routes FastAPI does not name in the scope, by id of their endpoint
        # (built once; the routes live as long as the app).
        self._templates: dict[int, str] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def recorded(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recorded)
        finally:
            route = self._route_template(scope)
            method = scope["method"]
            elapsed = time.perf_counter() - start - scope.get(WAITED, 0.0)
            self.metrics.request_seconds.labels(method, route).observe(elapsed)
            self.metrics.requests.labels(method, route, str(status)).inc()

    def _route_template(self, scope: Scope) -> str:
        # FastAPI stores its matched API route in the scope; a plain Starlette route (the
        # OpenAPI document) or a mount (the docs' assets) leaves only its endpoint there.
        path = getattr(scope.get("route"), "path", None)
        if isinstance(path, str):
            return path
        endpoint = scope.get("endpoint")
        if endpoint is None:
            return "unmatched"  # nothing matched: a 404 or 405
        if self._templates is None:
            self._templates = _endpoint_templates(getattr(scope.get("app"), "routes", []))
        return self._templates.get(id(endpoint), "unmatched")


def _endpoint_templates(routes: list[object]) -> dict[int, str]:
    templates: dict[int, str] = {}
    for route in routes:
        if isinstance(route, Route):
            templates[id(route.endpoint)] = route.path_format
        elif isinstance(route, Mount):
            templates[id(route.app)] = route.path_format
    return templates
