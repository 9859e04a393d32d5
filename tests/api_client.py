"""Helpers for driving the API: German credit rows as requests, problem checks, ASGI client."""

import csv
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import xgboost as xgb
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from service.app import create_app
from service.core.formats.xgboost import XgboostModel
from service.core.registry import LoadedModel
from service.metrics import Metrics
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
GERMAN_CREDIT = ROOT / "data" / "german_credit.csv"
MODELS = ROOT / "models"
PROBLEM = "application/problem+json"
# service.core.keys.DEV_KEY_FILE, spelled out: a test that reads it checks the documented path.
DEV_KEY_FILE = "dev-api-key"
# The console script installed next to this interpreter, as a user would run it.
SHAPSTREAM = str(Path(sys.executable).with_name("shapstream"))


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


def dev_key(data_dir: Path) -> str:
    """The development key the embedded mode wrote at its first start."""
    return (data_dir / DEV_KEY_FILE).read_text().strip()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def create_key(name: str, scopes: str, env: Mapping[str, str] | None = None) -> str:
    """A new key from `shapstream keys create`, run as a real subprocess (stdout is the key)."""
    done = subprocess.run(
        [SHAPSTREAM, "keys", "create", "--name", name, "--scopes", scopes],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


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


@asynccontextmanager
async def embedded_client(
    data_dir: Path,
    metrics: Metrics | None = None,
    *,
    authorized: bool = True,
    models_dir: Path = MODELS,
) -> AsyncIterator[httpx.AsyncClient]:
    """The service in embedded mode with the shipped models (or `models_dir`'s); `authorized`:
    with the dev key,
    which holds every scope (tests/unit/test_auth.py covers refusals)."""
    settings = Settings(mode="embedded", data_dir=data_dir, models_dir=models_dir)
    async with asgi_client(create_app(settings, metrics)) as client:
        if authorized:
            client.headers.update(bearer(dev_key(data_dir)))
        yield client


def booster_of(model: LoadedModel) -> xgb.Booster:
    """The booster of an XGBoost model: xgboost's own object, for its own predictions."""
    framework = model.framework
    assert isinstance(framework, XgboostModel), model.format
    return framework.booster
