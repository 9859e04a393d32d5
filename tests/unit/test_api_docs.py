"""The API's documentation: /docs and /redoc served whole by the service (nothing from a CDN),
and an OpenAPI document that says what the API answers and takes, model by model."""

import json
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.app import create_app
from service.settings import Settings
from tests.api_client import MODELS, PROBLEM, asgi_client, bearer, dev_key, embedded_client

# Where a page names a resource to load: attributes, and Swagger UI's `url: '...'`.
_REFERENCES = re.compile(r"""(?:src|href|spec-url)="([^"]+)"|\burl: '([^']+)'""")


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with embedded_client(tmp_path, authorized=False) as c:
        yield c


async def test_docs_pages_load_everything_from_the_service(client: httpx.AsyncClient) -> None:
    served: set[str] = set()
    for page in ("/docs", "/redoc"):
        answer = await client.get(page)
        assert answer.status_code == 200
        # No address of another host, so nothing can be fetched from one.
        assert "://" not in answer.text
        urls = {a or b for a, b in _REFERENCES.findall(answer.text)}
        assert len(urls) >= 3, (page, urls)  # a script, an icon, the document (and a style)
        served |= urls
    # What the scripts load by themselves: ReDoc's logo, from beside its page.
    served.add("/redoc/logo-mini.svg")
    for url in sorted(served):
        assert url.startswith("/"), url
        assert not url.startswith("//"), url
        asset = await client.get(url)
        assert asset.status_code == 200, url
        assert asset.content, url
    redoc = (await client.get("/redoc/redoc.standalone.js")).text
    assert "cdn.redoc.ly" not in redoc
    assert "fonts.googleapis.com" not in (await client.get("/redoc")).text
    # Swagger UI would ask validator.swagger.io about the document for its badge.
    assert '"validatorUrl": null' in (await client.get("/docs")).text


def _resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


async def test_the_document_describes_every_error_as_a_problem(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    assert "HTTPValidationError" not in json.dumps(document)
    problem = document["components"]["schemas"]["Problem"]
    assert {"type", "title", "status", "detail"} <= set(problem["required"])
    field = _resolve(document, problem["properties"]["errors"]["items"])
    assert set(field["required"]) == {"field", "reason"}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            if path.startswith("/v1/"):
                assert "503" in responses, (method, path)
                assert "401" in responses, (method, path)
            for status, response in responses.items():
                if status[0] not in "45":
                    continue
                assert list(response["content"]) == [PROBLEM], (method, path, status)
                schema = _resolve(document, response["content"][PROBLEM]["schema"])
                assert "errors" in schema["properties"], (method, path, status)
                if status == "503":
                    assert response["headers"]["Retry-After"]["required"] is True
                if status == "401":
                    assert response["headers"]["WWW-Authenticate"]["required"] is True

    predict = document["paths"]["/v1/predictions"]["post"]
    assert {"400", "401", "403", "409", "413", "415", "422", "503"} <= set(predict["responses"])
    retry = _resolve(document, predict["responses"]["503"]["content"][PROBLEM]["schema"])
    assert "transaction_id" in retry["properties"]
    forbidden = document["paths"]["/v1/models"]["get"]["responses"].get("403")
    assert forbidden is None, "any valid key reads the models"
    missing_scope = _resolve(document, predict["responses"]["403"]["content"][PROBLEM]["schema"])
    assert "missing_scope" in missing_scope["required"]


async def test_transaction_id_is_optional_and_explained(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    body = document["paths"]["/v1/predictions"]["post"]["requestBody"]["content"]
    schema = body["application/json"]["schema"]
    # One request schema per served model (the shipped models directory serves two).
    for request in schema.get("anyOf", [schema]):
        assert "transaction_id" not in request["required"]
        assert "features" in request["required"]
        described = request["properties"]["transaction_id"]["description"]
        assert described.startswith("Optional")
        assert "never decided twice" in described
        assert "409" in described


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema of a feature's values, whether null is allowed too or not."""
    alternatives: list[dict[str, Any]] = schema.get("anyOf", [schema])
    values = [s for s in alternatives if s.get("type") != "null"]
    assert len(values) == 1, schema
    return values[0]


def _two_models(root: Path) -> Path:
    models = root / "models"
    for name in ("german-credit", "german-credit-b"):
        shutil.copytree(MODELS / "german-credit", models / name)
        schema_file = models / name / "schema.json"
        schema = json.loads(schema_file.read_text())
        schema["name"] = name
        schema_file.write_text(json.dumps(schema))
    return models


async def test_each_served_model_has_its_request_schema_and_example(tmp_path: Path) -> None:
    settings = Settings(
        mode="embedded",
        data_dir=tmp_path / "data",
        models_dir=_two_models(tmp_path),
        default_model="german-credit",
    )
    app = create_app(settings)
    generic = app.openapi()["paths"]["/v1/predictions"]["post"]["requestBody"]["content"]
    assert "examples" not in generic["application/json"], "no models before the lifespan"
    async with asgi_client(app) as client:
        client.headers.update(bearer(dev_key(tmp_path / "data")))
        document = (await client.get("/openapi.json")).json()
        content = document["paths"]["/v1/predictions"]["post"]["requestBody"]["content"]
        media = content["application/json"]
        assert set(media["examples"]) == {"german-credit", "german-credit-b"}
        by_title = {s["title"]: s for s in media["schema"]["anyOf"]}
        default = by_title["PredictionRequest (german-credit)"]
        other = by_title["PredictionRequest (german-credit-b)"]
        assert default["required"] == ["features"]
        assert other["required"] == ["features", "model"]
        features = other["properties"]["features"]
        assert features["additionalProperties"] is False
        assert len(features["required"]) == 20
        purpose = _not_null(features["properties"]["purpose"])
        assert "radio/television" in purpose["enum"]
        age = _not_null(features["properties"]["age_in_years"])
        assert (age["minimum"], age["maximum"]) == (18, 100)
        for name, example in media["examples"].items():
            answer = await client.post("/v1/predictions", json=example["value"])
            assert answer.status_code == 200, answer.text
            assert answer.json()["model"]["name"] == name
