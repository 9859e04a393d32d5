"""Liveness, readiness and metrics: open to anyone who can reach the port."""

from typing import Any

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from service.api.deps import State
from service.core.breaker import BreakerState
from service.errors import Unavailable

router = APIRouter(tags=["health"])

# How the store looks from the gateway, by the state of its circuit breaker.
_STORE_STATES = {
    BreakerState.CLOSED: "up",
    BreakerState.OPEN: "unreachable",
    BreakerState.HALF_OPEN: "probing",
}


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={503: {"description": "this gateway cannot take decisions now (e.g. spool full)"}},
)
async def readyz(state: State) -> dict[str, Any]:
    """Whether this gateway takes decisions now, and how (straight to Kafka, or spooled).

    About this gateway only: a store or broker outage is shared by every gateway, and taking
    them all out of rotation for it would turn a partial outage into a total one. Answered
    from the gateway's own state, without waiting on the network.
    """
    bus = state.bus.status()
    body: dict[str, Any] = {
        "status": "ready" if bus.accepting else "not ready",
        "spooling": bus.spooling,
        "spool": {"events": bus.spooled_events, "bytes": bus.spooled_bytes},
        "store": _STORE_STATES[state.store_guard.breaker.state],
    }
    if bus.detail:
        body["detail"] = bus.detail
    if not bus.accepting:
        raise Unavailable(f"Not ready: {bus.detail}.", extra=body)
    return body


@router.get("/metrics", include_in_schema=False)
async def metrics(state: State) -> Response:
    """Prometheus exposition."""
    store_up = state.store_guard.breaker.state is BreakerState.CLOSED
    state.metrics.dependency_up.labels(dependency="store").set(1 if store_up else 0)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
