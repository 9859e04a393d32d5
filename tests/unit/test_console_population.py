"""The console's population page over HTTP, in the embedded mode: its importance bars, drift
table and reason frequencies are the population API's numbers for the same window, under the
same scope (audit:export). (tests/browser opens it in Chromium.)"""

import re
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from html import unescape
from pathlib import Path
from typing import Any

import httpx
import pytest
import xgboost as xgb
from sklearn.datasets import load_wine

from service.api import population as population_api
from service.app import create_app
from service.core.access import Scope
from service.core.population.drift import DriftRule
from service.settings import ConsoleSettings, Settings
from service.tools.model_init import init_model_dir
from tests.api_client import MODELS, asgi_client, bearer, dev_key, german_rows
from tests.polling import until
from tests.unit.test_auth import put_key
from tests.unit.test_console import decide, sign_in

MODEL = "german-credit"
DECISIONS = 30
# Loose enough for a few dozen decisions to flag a feature: the first rows of the German credit
# data are all of one personal status, which the reference (a random hold-out) is not.
LOOSE_RULE = DriftRule(min_decisions=10, psi_threshold=0.2, ks_alpha=0.5)


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        mode="embedded", data_dir=tmp_path, models_dir=MODELS, console=ConsoleSettings()
    )
    async with asgi_client(create_app(settings)) as c:
        yield c


async def served_version(client: httpx.AsyncClient, key: str, name: str = MODEL) -> str:
    models = (await client.get("/v1/models", headers=bearer(key))).json()["models"]
    version: str = next(m for m in models if m["name"] == name)["version"]
    return version


async def decided(
    client: httpx.AsyncClient, key: str, name: str, version: str, rows: list[dict[str, Any]]
) -> None:
    """Decide `rows` and wait until the population aggregates count them all (the worker
    writes them after the records)."""
    for i, row in enumerate(rows):
        await decide(client, key, f"population-{i}", row)
    url = f"/v1/models/{name}/versions/{version}/importance"

    async def counted() -> bool:
        answer = await client.get(url, headers=bearer(key))
        decisions: int = answer.json()["decisions"]
        return decisions == len(rows)

    await until(counted, timeout_s=10)


def window() -> dict[str, str]:
    # Explicit days, the same for the page and the API even across midnight.
    today = datetime.now(UTC).date()
    return {"start": (today - timedelta(days=6)).isoformat(), "end": today.isoformat()}


def nullable(text: str) -> float | None:
    return float(text) if text else None


def importance_bars(page: str) -> list[tuple[str, float, float | None]]:
    found = re.findall(
        r'<g class="imp-bar" data-feature="([^"]*)" data-value="([^"]*)" '
        r'data-reference="([^"]*)">',
        page,
    )
    return [(unescape(f), float(v), nullable(r)) for f, v, r in found]


def drift_rows(page: str) -> list[dict[str, Any]]:
    found = re.findall(
        r'<tr class="drift-row( flagged)?" data-feature="([^"]*)" data-psi="([^"]*)"\s+'
        r'data-js="([^"]*)" data-ks="([^"]*)" data-p="([^"]*)" data-n="([^"]*)"\s+'
        r'data-drifting="([^"]*)" data-input-psi="([^"]*)">',
        page,
    )
    return [
        {
            "flagged": flagged == " flagged",
            "feature": unescape(feature),
            "psi": nullable(psi),
            "js": nullable(js),
            "ks": nullable(ks),
            "ks_p_value": nullable(p),
            "n_current": int(n),
            "drifting": drifting == "true",
            "input_psi": nullable(input_psi),
        }
        for flagged, feature, psi, js, ks, p, n, drifting, input_psi in found
    ]


def reason_cells(page: str) -> dict[tuple[str, str], float | None]:
    found = re.findall(
        r'<td class="num" data-day="([^"]*)" data-family="([^"]*)" data-count="[^"]*" '
        r'data-value="([^"]*)">',
        page,
    )
    return {(day, unescape(family)): nullable(value) for day, family, value in found}


def strip_counts(page: str, source: str) -> dict[str, int]:
    """Each beeswarm row's decisions in its `source` strip (the sum of its cells' counts)."""
    counts = {}
    for feature, body in re.findall(
        r'<g class="swarm-row" data-feature="([^"]*)"(.*?)</g>\s*</g>', page, re.S
    ):
        strip = re.search(rf'<g class="strip {source}"(.*?)</g>', body + "</g>", re.S)
        assert strip is not None, (feature, source)
        cells = re.findall(r'data-count="(\d+)"', strip.group(1))
        counts[unescape(feature)] = sum(map(int, cells))
    return counts


async def test_the_population_page_shows_the_apis_figures(
    client: httpx.AsyncClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(population_api, "RULE", LOOSE_RULE)
    key = dev_key(tmp_path)
    version = await served_version(client, key)
    await decided(client, key, MODEL, version, german_rows(DECISIONS))
    await sign_in(client, key)
    params = {"version": version, **window()}
    page = await client.get(f"/ui/models/{MODEL}/population", params=params)
    assert page.status_code == 200, page.text
    html = page.text
    api_url = f"/v1/models/{MODEL}/versions/{version}"
    importance = (
        await client.get(f"{api_url}/importance", params=window(), headers=bearer(key))
    ).json()
    drift = (await client.get(f"{api_url}/drift", params=window(), headers=bearer(key))).json()
    reasons = (await client.get(f"{api_url}/reasons", params=window(), headers=bearer(key))).json()
    assert importance["decisions"] == DECISIONS

    # Importance: the API's mean |phi| per feature, in its order, beside the reference's.
    (output,) = importance["outputs"]
    assert importance_bars(html) == [
        (f["feature"], f["mean_abs"], f["reference_mean_abs"]) for f in output["features"]
    ]
    assert all(f["reference_mean_abs"] is not None for f in output["features"])

    # Drift: the API's figures of the window, flagged features first and highlighted.
    rows = drift_rows(html)
    (figures,) = drift["total"]["outputs"]
    inputs = {i["feature"]: i["psi"] for i in drift["total"]["inputs"]}
    assert {r["feature"]: r for r in rows} == {
        f["feature"]: {
            "flagged": f["drifting"],
            **{k: f[k] for k in ("feature", "psi", "js", "ks", "ks_p_value", "n_current")},
            "drifting": f["drifting"],
            "input_psi": inputs[f["feature"]],
        }
        for f in figures["features"]
    }
    flagged = [r["feature"] for r in rows if r["flagged"]]
    assert drift["total"]["drifting"], "the loose rule flags a feature: else this proves little"
    assert len(drift["total"]["drifting"]) < len(rows)
    assert sorted(flagged) == drift["total"]["drifting"]
    assert [r["flagged"] for r in rows] == [True] * len(flagged) + [False] * (
        len(rows) - len(flagged)
    )
    listed = re.search(r'<ul id="drifting" class="inline">(.*?)</ul>', html, re.S)
    assert listed is not None
    assert re.findall(r'data-feature="([^"]*)"', listed.group(1)) == drift["total"]["drifting"]
    assert float(re.findall(r'id="ndcg" data-value="([^"]*)"', html)[0]) == figures["ndcg"]

    # Reasons: the share of each day's denials giving each family, as the API has it.
    cells = reason_cells(html)
    assert reasons["denials"] > 0
    assert {family for _, family in cells} == set(reasons["families"])
    expected = {
        (day["day"], family): (day["frequencies"].get(family, 0.0) if day["denials"] else None)
        for day in reasons["days"]
        for family in reasons["families"]
    }
    assert cells == expected

    # The beeswarm's strips hold every decision of the window, and the reference's.
    assert strip_counts(html, "window") == {f["feature"]: DECISIONS for f in output["features"]}
    reference = drift["reference"]["decisions"]
    assert strip_counts(html, "reference") == {f["feature"]: reference for f in output["features"]}
    assert re.search(rf'data-start="{params["start"]}" data-end="{params["end"]}"', html)


async def test_the_model_page_links_to_its_population_page_and_the_scope_is_checked(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    version = await served_version(client, dev_key(tmp_path))
    reader = await put_key(tmp_path, "reader", frozenset({Scope.EXPLANATIONS_READ}))
    await sign_in(client, reader)
    model = (await client.get(f"/ui/models/{MODEL}")).text
    link = re.search(r'<a id="population-link" href="([^"]*)">', model)
    assert link is not None
    assert unescape(link.group(1)) == f"/ui/models/{MODEL}/population?version={version}"

    refused = await client.get(unescape(link.group(1)))
    assert refused.status_code == 403
    assert refused.headers["content-type"].startswith("text/html")
    assert "Not allowed" in refused.text
    assert "audit:export" in refused.text


async def test_the_population_page_without_a_session_goes_to_sign_in(
    client: httpx.AsyncClient,
) -> None:
    answer = await client.get(f"/ui/models/{MODEL}/population", params={"start": "2026-01-01"})
    assert answer.status_code == 303
    assert answer.headers["location"] == (
        f"/ui/sign-in?next=/ui/models/{MODEL}/population%3Fstart%3D2026-01-01"
    )


async def test_the_window_follows_the_apis_rules(client: httpx.AsyncClient, tmp_path: Path) -> None:
    await sign_in(client, dev_key(tmp_path))
    url = f"/ui/models/{MODEL}/population"
    page = (await client.get(url)).text
    today = datetime.now(UTC).date()
    start = date.fromisoformat(re.findall(r'data-start="([^"]*)"', page)[0])
    end = date.fromisoformat(re.findall(r'data-end="([^"]*)"', page)[0])
    # The last 7 days by default (read after the page: it may have been yesterday's).
    assert end in (today, today - timedelta(days=1))
    assert (end - start).days == population_api.DEFAULT_DAYS - 1
    assert 'id="no-decisions"' in page

    for params in (
        {"start": "2026-03-02", "end": "2026-03-01"},
        {"start": "2025-01-01", "end": "2026-01-02"},
        {"start": "not-a-day"},
    ):
        bad = await client.get(url, params=params)
        assert bad.status_code == 422, params
        assert bad.headers["content-type"].startswith("text/html")
    longest = {"start": "2025-01-01", "end": "2026-01-01"}
    assert (await client.get(url, params=longest)).status_code == 200
    assert (await client.get(url, params={"version": "nope"})).status_code == 404
    assert (await client.get("/ui/models/no-such-model/population")).status_code == 404


async def test_a_multiclass_version_without_a_reference_shows_importance_per_class(
    tmp_path: Path,
) -> None:
    x, y = load_wine(return_X_y=True)
    params = {"objective": "multi:softprob", "num_class": 3, "max_depth": 3, "nthread": 1}
    booster = xgb.train(params, xgb.DMatrix(x, y), 20)
    booster.save_model(tmp_path / "wine.json")
    labels = ["barolo", "grignolino", "barbera"]
    schema = init_model_dir(tmp_path / "wine.json", tmp_path / "models" / "wine", classes=labels)
    settings = Settings(mode="embedded", data_dir=tmp_path / "data", models_dir=tmp_path / "models")
    async with asgi_client(create_app(settings)) as client:
        key = dev_key(tmp_path / "data")
        version = await served_version(client, key, "wine")
        rows: list[dict[str, Any]] = [
            dict(zip(schema.feature_names, map(float, x[i]), strict=True)) for i in (0, 70, 140)
        ]
        await decided(client, key, "wine", version, rows)
        await sign_in(client, key)
        api = await client.get(
            f"/v1/models/wine/versions/{version}/importance", params=window(), headers=bearer(key)
        )
        outputs = {o["output"]: o["features"] for o in api.json()["outputs"]}
        for label in labels:
            page = await client.get(
                "/ui/models/wine/population", params={"class": label, **window()}
            )
            assert page.status_code == 200, page.text
            html = page.text
            assert f'<option value="{label}" selected>' in html
            assert importance_bars(html) == [
                (f["feature"], f["mean_abs"], None) for f in outputs[label]
            ]
            assert strip_counts(html, "window") == {f["feature"]: 3 for f in outputs[label]}
            assert 'id="no-reference-note"' in html
            assert 'id="drift-needs-reference"' in html
            assert "drift-row" not in html
