"""The FastAPI application factory."""

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.api import access_log, audit, explanations, health, models, population, predictions
from service.api.deps import STATE_KEY
from service.api.docs import install_docs
from service.api.middleware import BodyLimit, LoadShedding, RequestMetrics
from service.api.openapi import ApiDocument
from service.api.problems import install_problem_handlers
from service.api.ui import install_console
from service.metrics import Metrics, create_metrics
from service.resources import open_resources
from service.settings import Settings

DESCRIPTION = (
    "Scores XGBoost decisions in milliseconds and stores the exact TreeSHAP explanation of "
    "each one under its transaction id."
)


def create_app(settings: Settings, metrics: Metrics | None = None) -> FastAPI:
    """Build the app; its lifespan opens the registry, bus and store and closes them."""
    app_metrics = metrics if metrics is not None else create_metrics()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[dict[str, object]]:
        async with open_resources(settings, app_metrics) as state:
            with document.serving(state.registry):
                # Everything loaded so far (models, clients, modules) lives as long as the
                # process: kept out of the collector, a full collection no longer walks it
                # mid-request.
                gc.freeze()
                yield {STATE_KEY: state}

    app = FastAPI(
        title="shapstream",
        description=DESCRIPTION,
        version="0.1.0",
        lifespan=lifespan,
        # Metrics are Prometheus (service/metrics.py); FastAPI's own OpenTelemetry hooks would
        # cost a check on every request for nothing.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        # Served by install_docs, from this process rather than a CDN.
        docs_url=None,
        redoc_url=None,
    )
    # The document with problem bodies, and with each served model's request schema and example
    # while the lifespan has the registry open.
    document = ApiDocument(app)
    app.openapi = document  # type: ignore[method-assign]
    install_problem_handlers(app)
    for router in (predictions.router, explanations.router, models.router, health.router):
        app.include_router(router)
    app.include_router(access_log.router)
    app.include_router(audit.router)
    app.include_router(population.router)
    # After the API's routes: a request is matched against the routes in order.
    install_docs(app)
    install_console(app, settings.console)
    # The last added runs first: every request is counted, then shed or let in, then limited.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(
        LoadShedding, max_in_flight=settings.gateway.max_in_flight, metrics=app_metrics
    )
    app.add_middleware(RequestMetrics, metrics=app_metrics)
    return app
