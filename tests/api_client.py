"""Helpers for driving the API: German credit rows as requests, problem checks, ASGI client."""

import csv
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

ROOT = Path(__file__).resolve().parents[1]
GERMAN_CREDIT = ROOT / "data" / "german_credit.csv"
MODELS = ROOT / "models"
PROBLEM = "application/problem+json"


def german_rows(limit: int | None = None) -> list[dict[str, Any]]:
    """Applicants as request features: numbers as numbers, categorical labels as text."""
    with GERMAN_CREDIT.open(newline="") as f:
        rows = list(csv.DictReader(f))[:limit]
    features = []
    for row in rows:
        del row["creditability"]
        features.append({k: int(v) if v.lstrip("-").isdigit() else v for k, v in row.items()})
    return features


def problem_fields(response: httpx.Response) -> set[str]:
    """The fields a problem+json answer names (and a check that it is one)."""
    assert response.headers["content-type"] == PROBLEM, response.text
    body = response.json()
    assert body["status"] == response.status_code
    assert body["type"].startswith("https://")
    return {e["field"] for e in body.get("errors", [])}


@asynccontextmanager
async def asgi_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process client that runs the app's lifespan, as a server would."""
    async with app.router.lifespan_context(app) as state:

        async def with_state(scope: Scope, receive: Receive, send: Send) -> None:
            scope["state"] = dict(state or {})
            await app(scope, receive, send)

        transport = httpx.ASGITransport(app=with_state)
        async with httpx.AsyncClient(transport=transport, base_url="http://shapstream") as client:
            yield client
