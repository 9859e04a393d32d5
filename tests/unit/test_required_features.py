"""Through the API: a required feature left null is a 422 naming it, not a decision; an optional
one left null is decided, and a denial says it was not provided instead of judging its value."""

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from service.core.registry import LoadedModel
from tests.api_client import (
    MODELS,
    embedded_client,
    german_rows,
    problem_fields,
)

ROWS = german_rows(40)


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with embedded_client(tmp_path) as c:
        yield c


async def test_a_required_feature_left_null_is_refused(client: httpx.AsyncClient) -> None:
    answer = await client.post(
        "/v1/predictions", json={"features": {**ROWS[1], "credit_amount": None}}
    )
    assert answer.status_code == 422, answer.text
    assert problem_fields(answer) == {"features.credit_amount"}
    everything_null = dict.fromkeys(ROWS[1])
    answer = await client.post("/v1/predictions", json={"features": everything_null})
    assert answer.status_code == 422, answer.text
    schema = LoadedModel.from_directory(MODELS / "german-credit").schema
    required = {f"features.{f.name}" for f in schema.features if not f.nullable}
    assert problem_fields(answer) == required


async def test_a_denial_says_what_was_not_provided(client: httpx.AsyncClient) -> None:
    # Applicant 1 is denied; without its checking account status, that push is "not provided".
    features = {**ROWS[1], "status_of_existing_checking_account": None}
    answer = await client.post("/v1/predictions", json={"features": features})
    assert answer.status_code == 200, answer.text
    assert answer.json()["prediction"]["decision"] == "deny"
    txn = answer.json()["transaction_id"]
    found = await client.get(f"/v1/explanations/{txn}", params={"wait": 10})
    assert found.status_code == 200, found.text
    reasons = {r["family"]: r for r in found.json()["reasons"]}
    assert reasons["checking"]["reason"] == "Checking account information not provided"
    assert reasons["checking"]["features"] == ["status_of_existing_checking_account"]
    assert all(r["reason"] != "Status of checking account" for r in reasons.values())
