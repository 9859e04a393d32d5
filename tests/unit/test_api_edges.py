"""Rough edges a new or hostile client finds: strings no encoder takes, bodies not declared as
JSON, keys given twice; and what the request metrics say of the docs and of waits."""

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from service.api.json_keys import repeated_key, repeats_no_key
from service.api.predictions import PredictionRequest
from service.api.problems import problem_response
from service.app import create_app
from service.errors import FieldProblem
from service.metrics import Metrics, create_metrics
from service.settings import Settings
from tests.api_client import (
    MODELS,
    PROBLEM,
    asgi_client,
    bearer,
    dev_key,
    embedded_client,
    german_rows,
    problem_fields,
)

ROW = german_rows(1)[0]
FEATURES = orjson.dumps(ROW)
AS_JSON = {"content-type": "application/json"}


@pytest.fixture
def metrics() -> Metrics:
    return create_metrics(CollectorRegistry())


@pytest.fixture
async def client(tmp_path: Path, metrics: Metrics) -> AsyncIterator[httpx.AsyncClient]:
    async with embedded_client(tmp_path, metrics) as c:
        yield c


# Item 1: whatever a problem body echoes, it can be encoded.


@pytest.mark.parametrize("text", ["\ud800", "features.\udc80x", "a\udfff\ud800b", "plain"])
def test_problem_bodies_encode_any_string(text: str) -> None:
    answer = problem_response(
        422,
        "invalid-request",
        "Invalid request",
        f"About {text}.",
        [FieldProblem(text, text)],
        {"transaction_id": text, text: [text]},
    )
    body = orjson.loads(answer.body)
    # A lone surrogate goes back escaped, as the client would have written it in JSON.
    echoed = text.encode("utf-8", "backslashreplace").decode()
    assert body["errors"] == [{"field": echoed, "reason": echoed}]
    assert (body["detail"], body["transaction_id"], body[echoed]) == (
        f"About {echoed}.",
        echoed,
        [echoed],
    )


def test_extension_members_never_replace_standard_ones() -> None:
    extra = {"status": "not ready", "type": "x", "spooling": True}
    body = orjson.loads(problem_response(503, "unavailable", "Unavailable", "d", (), extra).body)
    assert (body["status"], body["type"], body["spooling"]) == (
        503,
        "https://shapstream.dev/problems/unavailable",
        True,
    )


@pytest.mark.parametrize(
    "body",
    [
        # The issue's `curl -d '{"features":{"\ud800":1}}'`.
        rb'{"features":{"\ud800":1}}',
        rb'{"features":{"\udc00":1}}',
        rb'{"features":{}, "transaction_id": "\ud800"}',
        rb'{"features":{"a":1, "\ud800":2, "a":3}}',
        b'{"features":{"\xed\xa0\x80":1}}',
    ],
)
async def test_a_lone_surrogate_gets_a_problem_not_a_500(
    client: httpx.AsyncClient, body: bytes
) -> None:
    answer = await client.post("/v1/predictions", content=body, headers=AS_JSON)
    assert 400 <= answer.status_code < 500, answer.text
    problem_fields(answer)


# Item 7: a body not declared as JSON.


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "application/jsonx", "text/json"],
)
async def test_a_body_not_declared_as_json_is_415(
    client: httpx.AsyncClient, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    body = orjson.dumps({"features": ROW})
    answer = await client.post("/v1/predictions", content=body, headers=headers)
    assert answer.status_code == 415, answer.text
    assert problem_fields(answer) == {"content-type"}
    assert "Content-Type: application/json" in answer.json()["detail"]
    assert answer.headers["accept-post"] == "application/json"


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"]
)
async def test_json_is_read_however_declared(client: httpx.AsyncClient, content_type: str) -> None:
    body = orjson.dumps({"features": ROW})
    answer = await client.post(
        "/v1/predictions", content=body, headers={"content-type": content_type}
    )
    assert answer.status_code == 200, answer.text


async def test_a_missing_key_is_told_before_the_media_type(client: httpx.AsyncClient) -> None:
    anonymous = {"Authorization": ""}
    answer = await client.post("/v1/predictions", content=b"x", headers=anonymous)
    assert answer.status_code == 401


# Item 14: keys given twice.


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"transaction_id": "a", "features": %b, "transaction_id": "b"}', "transaction_id"),
        (b'{"features": %b, "features": {}}', "features"),
        (b'{"features": {"age_in_years": 30, "age_in_years": 70}}', "features.age_in_years"),
        # Found even where the body is invalid anyway: the repeat is named, not its effect.
        (b'{"features": {"job": [{"k": 1}, {"k": 1, "k": 2}]}}', "features.job.1.k"),
        (
            b'{"transaction_id": "a", "features": %b, "transaction_id": "not an id"}',
            "transaction_id",
        ),
        (b'{"features": %b, "features": []}', "features"),
        (b'{"transaction_id"\n : "a",\t"transaction_id":"b", "features": %b}', "transaction_id"),
        # The same key, escaped once.
        (b'{"trans\\u0061ction_id": "a", "transaction_id": "b", "features": %b}', "transaction_id"),
    ],
)
async def test_repeated_keys_are_refused(
    client: httpx.AsyncClient, body: bytes, field: str
) -> None:
    raw = body.replace(b"%b", FEATURES)
    answer = await client.post("/v1/predictions", content=raw, headers=AS_JSON)
    assert answer.status_code == 400, answer.text
    assert problem_fields(answer) == {field}
    assert answer.json()["type"].endswith("/duplicate-key")


@pytest.mark.parametrize(
    "body",
    [
        # Same names in sibling objects, quotes and colons inside strings: no repeat.
        b'{"transaction_id": "t-1", "features": %b}',
        b'{"features": %b, "model": "german-credit"}',
        b'{"features": {"a": {"k": 1}, "b": {"k": "\\"k\\": 2"}}}',
        b'{"features": {"a\\"b": 1, "a\\\\": ":\\"", "c": [{"x": 1}, {"x": 2}]}}',
    ],
)
async def test_no_repeat_is_seen_where_there_is_none(
    client: httpx.AsyncClient, body: bytes
) -> None:
    raw = body.replace(b"%b", FEATURES)
    answer = await client.post("/v1/predictions", content=raw, headers=AS_JSON)
    assert answer.status_code in (200, 422), answer.text


KEYS = st.sampled_from(["a", "b", "features", 'q"', "\\", "\u00e9", "\U0001f600", "a:"])
LEAVES = st.none() | st.booleans() | st.integers() | st.sampled_from(["x", '"a":', "\\", ""])


def _json_objects(leaves: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """JSON text of objects whose keys may repeat, written with varied spacing and escapes."""
    spaces = st.sampled_from(["", " ", "\n  "])

    def encoded(key: str, ascii_only: bool) -> str:
        return json.dumps(key, ensure_ascii=ascii_only)

    pair = st.builds(
        lambda k, ascii_only, s1, s2, v: f"{encoded(k, ascii_only)}{s1}:{s2}{v}",
        KEYS,
        st.booleans(),
        spaces,
        spaces,
        leaves,
    )
    return st.lists(pair, max_size=5).map(lambda pairs: "{" + ", ".join(pairs) + "}")


JSON_TEXT = st.recursive(
    LEAVES.map(json.dumps),
    lambda inner: (
        _json_objects(inner) | st.lists(inner, max_size=3).map(lambda v: f"[{','.join(v)}]")
    ),
    max_leaves=10,
)


def _repeats(raw: bytes) -> bool:
    found = False

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal found
        found = found or len({k for k, _ in items}) != len(items)
        return dict(items)

    json.loads(raw, object_pairs_hook=pairs)
    return found


@settings(max_examples=400, deadline=None)
@given(features=_json_objects(JSON_TEXT), transaction_ids=st.integers(0, 2))
def test_the_repeat_check_is_exact(features: str, transaction_ids: int) -> None:
    head = "".join(f'"transaction_id": "t-{i}", ' for i in range(transaction_ids))
    raw = f'{{{head}"features": {features}}}'.encode()
    parsed = PredictionRequest.model_validate_json(raw)
    repeats = _repeats(raw)
    # Never "proven free of repeats" when it has one; never a repeat named where there is none.
    assert not (repeats and repeats_no_key(raw, parsed))
    assert (repeated_key(raw) is not None) == repeats
    if not repeats and b"\\" not in raw:
        assert repeats_no_key(raw, parsed), "the cheap proof should hold"


# Item 15: the docs are counted by their route, and a wait apart from the latency.


async def test_docs_and_the_document_are_counted_by_route(
    client: httpx.AsyncClient, metrics: Metrics
) -> None:
    routes = {
        "/docs": "/docs",
        "/redoc": "/redoc",
        "/openapi.json": "/openapi.json",
        "/docs/swagger/swagger-ui.css": "/docs/swagger/{path}",
        "/redoc/logo-mini.svg": "/redoc/{path}",
    }
    for path in routes:
        assert (await client.get(path)).status_code == 200, path
    assert (await client.get("/no/such/route")).status_code == 404
    for route in [*routes.values(), "unmatched"]:
        status = "404" if route == "unmatched" else "200"
        labels = {"method": "GET", "route": route, "status": status}
        assert metrics.registry.get_sample_value("shapstream_http_requests_total", labels) == 1.0


async def test_a_wait_is_measured_apart_from_the_latency(
    client: httpx.AsyncClient, metrics: Metrics
) -> None:
    answer = await client.get("/v1/explanations/never-decided", params={"wait": 0.3})
    assert answer.status_code == 404
    sample = metrics.registry.get_sample_value
    route = {"method": "GET", "route": "/v1/explanations/{transaction_id}"}
    assert sample("shapstream_http_request_seconds_count", route) == 1.0
    latency = sample("shapstream_http_request_seconds_sum", route)
    assert latency is not None
    assert latency < 0.2, "the 0.3 s wait is not the service's time"
    waited = {"outcome": "not-found"}
    assert sample("shapstream_explanation_wait_seconds_count", waited) == 1.0
    assert 0.29 <= (sample("shapstream_explanation_wait_seconds_sum", waited) or 0) < 1.0
    # A request that did not wait is not in the wait histogram.
    assert (await client.get("/v1/explanations/never-decided")).status_code == 404
    assert sample("shapstream_explanation_wait_seconds_count", waited) == 1.0
    assert answer.headers["content-type"] == PROBLEM


# Found by schemathesis: a 500 at the edge of time, and numbers taken for date-times.


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("/v1/audit/access-log?end=0001-01-01T00:00:00Z", "end"),
        ("/v1/audit/access-log?end=0.5", "end"),
        ("/v1/audit/access-log?start=1e3", "start"),
        ("/v1/audit/export?start=0.5&end=1.5", "start"),
    ],
)
async def test_audit_times_are_date_times_and_never_a_500(
    client: httpx.AsyncClient, query: str, field: str
) -> None:
    answer = await client.get(query)
    assert answer.status_code == 422, answer.text
    assert field in problem_fields(answer)


# Found by schemathesis: integers wider than 64 bits (which orjson does not write).


@pytest.mark.parametrize(
    ("value", "reason"),
    [(10**23, "must be <= 250000"), (-(10**30), "must be >= 1"), (10**400, "finite number")],
)
async def test_wide_integers_get_their_422(
    client: httpx.AsyncClient, value: int, reason: str
) -> None:
    for transaction_id in (None, "wide-1"):
        body: dict[str, Any] = {"features": {**ROW, "credit_amount": value}}
        if transaction_id:
            body["transaction_id"] = transaction_id
        answer = await client.post("/v1/predictions", content=json.dumps(body), headers=AS_JSON)
        assert answer.status_code == 422, answer.text
        assert problem_fields(answer) == {"features.credit_amount"}
        assert reason in answer.json()["errors"][0]["reason"]


async def test_a_wide_integer_is_decided_and_explained_as_a_float(tmp_path: Path) -> None:
    # A model whose credit_amount has no bound: 10**20 is a number it can score.
    models = tmp_path / "models"
    shutil.copytree(MODELS / "german-credit", models / "german-credit")
    schema_file = models / "german-credit" / "schema.json"
    schema = json.loads(schema_file.read_text())
    for feature in schema["features"]:
        if feature["name"] == "credit_amount":
            feature["maximum"] = None
    schema_file.write_text(json.dumps(schema))
    settings_ = Settings(mode="embedded", data_dir=tmp_path / "data", models_dir=models)
    async with asgi_client(create_app(settings_)) as client:
        client.headers.update(bearer(dev_key(tmp_path / "data")))
        body = {"transaction_id": "wide-2", "features": {**ROW, "credit_amount": 10**20}}
        for _ in range(2):  # a retry gets the same answer
            answer = await client.post("/v1/predictions", content=json.dumps(body), headers=AS_JSON)
            assert answer.status_code == 200, answer.text
        found = await client.get("/v1/explanations/wide-2", params={"wait": 10})
        assert found.status_code == 200, found.text
