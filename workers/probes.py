"""A worker's own HTTP port: GET /metrics, /healthz (liveness) and /readyz (readiness).

Served by uvicorn in the worker's event loop, so a loop blocked by synchronous code cannot
answer at all, which an orchestrator's probe timeout also counts as a failure.
"""

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Iterator

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from workers.health import Verdict, WorkerHealth

log = logging.getLogger(__name__)

# Open keep-alive connections (a Prometheus scraper) get this long to close at shutdown.
SHUTDOWN_GRACE_S = 2


def _answer(verdict: Verdict) -> JSONResponse:
    return JSONResponse(verdict.body, status_code=200 if verdict.ok else 503)


def create_probe_app(health: WorkerHealth, registry: CollectorRegistry) -> Starlette:
    """The three endpoints over `health` and the worker's metrics `registry`."""

    async def healthz(_: Request) -> Response:
        return _answer(health.liveness())

    async def readyz(_: Request) -> Response:
        return _answer(health.readiness())

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ]
    )


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the worker owns SIGTERM and SIGINT (finish the
    batch, commit, leave the group), and uvicorn's would replace them and re-raise on exit."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class PortUnavailable(Exception):
    """The probe port cannot be listened on (taken, or not allowed)."""


def bind(port: int, host: str = "0.0.0.0") -> socket.socket:  # noqa: S104 (probes come from outside)
    """A listening socket, bound now so a taken port fails the start, not a background task."""
    try:
        sock = socket.create_server((host, port))
    except OSError as exc:
        raise PortUnavailable(f"cannot listen on port {port}: {exc.strerror}") from exc
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def serving(app: Starlette, sock: socket.socket) -> AsyncIterator[None]:
    """Serve `app` on `sock` in this event loop for the duration of the block."""
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_config=None,
        access_log=False,
        ws="none",
        server_header=False,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="worker-probes")
    host, port = sock.getsockname()[:2]
    log.info("metrics, liveness and readiness on http://%s:%d/{metrics,healthz,readyz}", host, port)
    try:
        yield
    finally:
        server.should_exit = True
        await task
