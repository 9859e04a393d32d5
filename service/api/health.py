"""Liveness, readiness and metrics: open to anyone who can reach the port."""

import asyncio

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from service.api.deps import State
from service.errors import Unavailable

router = APIRouter(tags=["health"])

PROBE_TIMEOUT_S = 2.0


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "a dependency does not answer"}})
async def readyz(state: State) -> dict[str, str]:
    """The bus and the store both answer."""
    checks = {"bus": state.bus.ping(), "store": state.store.ping()}
    results = await asyncio.gather(
        *(asyncio.wait_for(c, PROBE_TIMEOUT_S) for c in checks.values()), return_exceptions=True
    )
    failed = [name for name, r in zip(checks, results, strict=True) if isinstance(r, BaseException)]
    if failed:
        raise Unavailable(
            f"Not ready: {', '.join(failed)} did not answer.", extra={"failed": failed}
        )
    return {"status": "ready"}


@router.get("/metrics", include_in_schema=False)
async def metrics(state: State) -> Response:
    """Prometheus exposition."""
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
