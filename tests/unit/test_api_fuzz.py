"""No request body, however malformed, gets a 5xx: every refusal is a 4xx problem+json."""

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.app import create_app
from service.settings import Settings
from tests.api_client import MODELS, PROBLEM, asgi_client, bearer, dev_key, german_rows

ROW = german_rows(1)[0]
JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


def _mutated_rows() -> st.SearchStrategy[dict[str, Any]]:
    """Real rows with some values replaced by arbitrary JSON, some names dropped or added."""
    return st.builds(
        lambda changes, dropped, extra: {
            **{k: v for k, v in ROW.items() if k not in dropped},
            **changes,
            **extra,
        },
        st.dictionaries(st.sampled_from(sorted(ROW)), JSON, max_size=4),
        st.sets(st.sampled_from(sorted(ROW)), max_size=2),
        st.dictionaries(st.text(max_size=8), JSON, max_size=2),
    )


BODIES = st.one_of(
    st.binary(max_size=200),
    # Python's encoder: it also writes big integers and NaN, which clients do send.
    JSON.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"features": _mutated_rows()},
        optional={"transaction_id": JSON, "model": JSON},
    ).map(lambda b: json.dumps(b).encode()),
)


@pytest.fixture(scope="module")
def client(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[asyncio.Runner, httpx.AsyncClient]]:
    data_dir: Path = tmp_path_factory.mktemp("fuzz")
    settings_ = Settings(mode="embedded", data_dir=data_dir, models_dir=MODELS)
    with asyncio.Runner() as runner:
        manager = asgi_client(create_app(settings_))
        api = runner.run(manager.__aenter__())
        # With a valid key, so the bodies reach validation instead of stopping at a 401.
        api.headers.update(bearer(dev_key(data_dir)))
        try:
            yield runner, api
        finally:
            runner.run(manager.__aexit__(None, None, None))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=BODIES)
def test_no_body_gets_a_server_error(
    client: tuple[asyncio.Runner, httpx.AsyncClient], body: bytes
) -> None:
    runner, api = client
    answer = runner.run(
        api.post("/v1/predictions", content=body, headers={"content-type": "application/json"})
    )
    assert answer.status_code < 500, answer.text
    if answer.status_code != 200:
        assert answer.headers["content-type"] == PROBLEM
        assert answer.json()["status"] == answer.status_code
