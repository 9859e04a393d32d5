"""The console's pages over HTTP, in the embedded mode: sessions, scopes, the access log, the
decision page's numbers, the notice and the list of recent decisions. (tests/browser drives the
same pages in Chromium.)"""

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from html import unescape
from pathlib import Path

import httpx
import pytest
import xgboost as xgb
from sklearn.datasets import load_wine

from service.api.ui import decisions as decision_pages
from service.api.ui.session import COOKIE, Sessions, safe_next
from service.app import create_app
from service.core.access import Scope, new_api_key
from service.settings import ConsoleSettings, Settings
from service.tools.model_init import init_model_dir
from tests.api_client import MODELS, asgi_client, bearer, dev_key, german_rows
from tests.polling import until
from tests.unit.test_auth import put_key

ORIGIN = "http://shapstream"
TTL_S = 600


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        mode="embedded",
        data_dir=tmp_path,
        models_dir=MODELS,
        console=ConsoleSettings(session_ttl_s=TTL_S, lender_name="Bank of Tests"),
    )
    async with asgi_client(create_app(settings)) as c:
        yield c


async def decide(client: httpx.AsyncClient, key: str, txn: str, row: dict[str, object]) -> str:
    """Decide and wait for the explanation; the decision ("approve" or "deny"), or the task
    of a model that does not decide."""
    answer = await client.post(
        "/v1/predictions", json={"transaction_id": txn, "features": row}, headers=bearer(key)
    )
    assert answer.status_code == 200, answer.text
    found = await client.get(f"/v1/explanations/{txn}", params={"wait": 10}, headers=bearer(key))
    assert found.status_code == 200, found.text
    prediction = answer.json()["prediction"]
    decision: str = prediction.get("decision") or prediction["task"]
    return decision


async def first_of_each(client: httpx.AsyncClient, key: str) -> dict[str, str]:
    """A denied and an approved German-credit applicant: their transaction ids by decision."""
    found: dict[str, str] = {}
    for i, row in enumerate(german_rows(40)):
        decision = await decide(client, key, f"console-{i}", row)
        found.setdefault(decision, f"console-{i}")
        if len(found) == 2:
            return found
    raise AssertionError(f"40 applicants gave only {sorted(found)}")


async def sign_in(client: httpx.AsyncClient, key: str, next_path: str = "") -> httpx.Response:
    return await client.post(
        "/ui/sign-in", data={"api_key": key, "next": next_path}, headers={"origin": ORIGIN}
    )


def bars(page: str) -> list[tuple[str, float]]:
    return [
        (unescape(feature), float(value))
        for feature, value in re.findall(
            r'<g class="bar [^"]*" data-feature="([^"]*)"\s+data-value="([^"]*)"', page
        )
    ]


def attribute(page: str, name: str) -> str:
    found = re.search(rf'{name}="([^"]*)"', page)
    assert found, name
    return unescape(found.group(1))


async def test_signing_in_sets_a_strict_http_only_cookie_that_opens_pages(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    txn = (await first_of_each(client, dev_key(tmp_path)))["deny"]
    refused = await sign_in(client, "ssk_not-a-key")
    assert refused.status_code == 401
    assert "not valid" in refused.text
    assert COOKIE not in client.cookies

    signed = await sign_in(client, dev_key(tmp_path), f"/ui/decisions/{txn}")
    assert signed.status_code == 303
    assert signed.headers["location"] == f"/ui/decisions/{txn}"
    cookie = signed.headers["set-cookie"].lower()
    for part in ("httponly", "samesite=strict", "path=/ui", f"max-age={TTL_S}"):
        assert part in cookie, cookie
    page = await client.get(f"/ui/decisions/{txn}")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"


async def test_a_page_without_a_session_goes_to_sign_in_and_back(
    client: httpx.AsyncClient,
) -> None:
    for path in ("/ui/decisions/some-txn", "/ui/decisions?day=2026-01-02", "/ui/models"):
        answer = await client.get(path)
        assert answer.status_code == 303
        assert answer.headers["location"].startswith("/ui/sign-in?next=/ui/")
    assert (await client.get("/")).headers["location"] == "/ui/"
    client.cookies.set(COOKIE, "eyJoIjoiMCIsImUiOjk5OTk5OTk5OTl9.c2lnbmVk", path="/ui")
    assert (await client.get("/ui/models")).status_code == 303


def test_sessions_refuse_forged_and_expired_cookies() -> None:
    sessions = Sessions(b"s" * 32, ttl_s=60)
    cookie = sessions.issue("ssk_key", now=1_000)
    assert sessions.read(cookie, now=1_059) is not None
    assert sessions.read(cookie, now=1_060) is None
    assert sessions.read(cookie[:-2] + "xx", now=1_000) is None
    assert Sessions(b"t" * 32, ttl_s=60).read(cookie, now=1_000) is None
    payload, _, signature = cookie.partition(".")
    assert sessions.read(payload[:-3] + "abc." + signature, now=1_000) is None


def test_after_sign_in_only_console_paths_are_followed() -> None:
    assert safe_next("/ui/decisions/x?class=a") == "/ui/decisions/x?class=a"
    for elsewhere in ("https://evil.example/ui/", "//evil.example/ui/", "/v1/models", None, ""):
        assert safe_next(elsewhere) == "/ui/decisions"


async def test_state_changing_requests_from_another_site_are_refused(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    crossed = await client.post(
        "/ui/sign-in", data={"api_key": dev_key(tmp_path)}, headers={"origin": "http://evil"}
    )
    assert crossed.status_code == 403
    assert COOKIE not in client.cookies
    fetched = await client.post(
        "/ui/sign-in",
        data={"api_key": dev_key(tmp_path)},
        headers={"sec-fetch-site": "cross-site"},
    )
    assert fetched.status_code == 403

    await sign_in(client, dev_key(tmp_path))
    page = (await client.get("/ui/models")).text
    token = attribute(page, 'name="csrf" value')
    forged = await client.post("/ui/sign-out", data={"csrf": "guess"}, headers={"origin": ORIGIN})
    assert forged.status_code == 403
    assert (await client.get("/ui/models")).status_code == 200
    out = await client.post("/ui/sign-out", data={"csrf": token}, headers={"origin": ORIGIN})
    assert out.status_code == 303
    assert (await client.get("/ui/models")).status_code == 303


async def test_a_key_without_the_scope_gets_a_403_page_and_the_refusal_is_logged(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    predictor = await put_key(tmp_path, "teller", frozenset({Scope.PREDICT}))
    await sign_in(client, predictor)
    page = await client.get("/ui/decisions/anything")
    assert page.status_code == 403
    assert page.headers["content-type"].startswith("text/html")
    assert "Not allowed" in page.text
    assert "explanations:read" in page.text

    async def logged() -> bool:
        # Refusals are written in the background, within a second or so.
        log = await client.get("/v1/audit/access-log", headers=bearer(dev_key(tmp_path)))
        refused = [e for e in log.json()["entries"] if e["action"] == "denied.forbidden"]
        return any(e["key_name"] == "teller" for e in refused)

    await until(logged, timeout_s=10)


async def test_the_decision_page_shows_the_stored_numbers_and_is_logged_as_a_read(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    key = dev_key(tmp_path)
    txn = (await first_of_each(client, key))["deny"]
    await sign_in(client, key)
    page = (await client.get(f"/ui/decisions/{txn}")).text
    api = (await client.get(f"/v1/explanations/{txn}", headers=bearer(key))).json()

    shown = bars(page)
    assert len(shown) == ConsoleSettings().max_bars
    features = [(f, v) for f, v in shown if f != "other"]
    assert [abs(v) for _, v in features] == sorted((abs(v) for _, v in features), reverse=True)
    for feature, value in features:
        assert value == pytest.approx(api["attributions"][feature], abs=1e-12)
    assert shown[-1][0] == "other"
    assert shown[-1][1] == pytest.approx(
        sum(v for f, v in api["attributions"].items() if f not in dict(features)), abs=1e-9
    )
    base, fx = float(attribute(page, "data-base")), float(attribute(page, "data-fx"))
    assert base == api["base_value"]
    assert fx == api["prediction"]["margin"]
    assert abs(base + sum(v for _, v in shown) - fx) < 1e-6
    assert attribute(page, "data-verified") == "true"
    reasons = re.findall(r'<li data-family="([^"]*)"[^>]*><span class="reason-text">([^<]*)<', page)
    assert [(f, unescape(t)) for f, t in reasons] == [
        (r["family"], r["reason"]) for r in api["reasons"]
    ]

    async def reads() -> list[dict[str, str]]:
        log = await client.get("/v1/audit/access-log", headers=bearer(key))
        entries: list[dict[str, str]] = log.json()["entries"]
        return [e for e in entries if e["action"] == "explanation.read" and e["target"] == txn]

    before = await reads()
    assert (await client.get(f"/ui/decisions/{txn}")).status_code == 200
    after = await reads()
    assert len(after) == len(before) + 1
    assert after[-1]["key_name"] == "development"


async def test_two_decisions_of_a_version_share_the_waterfall_axis(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    key = dev_key(tmp_path)
    ids = await first_of_each(client, key)
    await sign_in(client, key)
    axes = set()
    for txn in (ids["deny"], ids["approve"], ids["deny"]):
        page = (await client.get(f"/ui/decisions/{txn}")).text
        axes.add((attribute(page, "data-axis-min"), attribute(page, "data-axis-max")))
        base = float(attribute(page, "data-base"))
        low, high = (float(x) for x in next(iter(axes)))
        # Symmetric around the base value.
        assert base - low == pytest.approx(high - base)
    assert len(axes) == 1


async def test_the_notice_states_the_reasons_and_never_a_protected_attribute(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    key = dev_key(tmp_path)
    ids = await first_of_each(client, key)
    await sign_in(client, key)
    api = (await client.get(f"/v1/explanations/{ids['deny']}", headers=bearer(key))).json()
    models = (await client.get("/v1/models", headers=bearer(key))).json()["models"]
    schema = next(m for m in models if m["name"] == api["model"]["name"])["model_schema"]
    protected = [f for f in schema["features"] if f["protected"]]
    assert protected, "the demo model marks protected attributes: the check would prove nothing"

    page = (await client.get(f"/ui/decisions/{ids['deny']}/notice")).text
    letter = unescape(page[page.index('<article id="notice"') : page.index("</article>")])
    assert re.findall(r"<li>([^<]*)</li>", letter) == [r["reason"] for r in api["reasons"]]
    assert "Bank of Tests" in letter
    assert datetime.fromisoformat(api["decided_at"]).astimezone(UTC).strftime("%B %d, %Y") in letter
    for feature in protected:
        assert feature["name"] not in letter
        if feature["description"]:
            assert feature["description"] not in letter

    from_api = await client.get(f"/v1/explanations/{ids['deny']}/notice", headers=bearer(key))
    assert from_api.status_code == 200
    assert from_api.headers["content-type"].startswith("text/html")
    assert (
        unescape(
            from_api.text[
                from_api.text.index('<article id="notice"') : from_api.text.index("</article>")
            ]
        )
        == letter
    )

    approved = (await client.get(f"/ui/decisions/{ids['approve']}/notice")).text
    assert 'id="no-adverse-action"' in approved
    assert 'id="notice-reasons"' not in approved


async def test_recent_decisions_are_listed_newest_first_in_pages(
    client: httpx.AsyncClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(decision_pages, "PAGE_ROWS", 2)
    key = dev_key(tmp_path)
    ids = [f"listed-{i}" for i in range(5)]
    for txn, row in zip(ids, german_rows(5), strict=True):
        await decide(client, key, txn, row)
    await sign_in(client, key)
    seen: list[str] = []
    url: str | None = "/ui/decisions?model=german-credit"
    while url is not None:
        page = await client.get(url)
        assert page.status_code == 200, page.text
        seen += re.findall(r'<a href="/ui/decisions/([^"?/]+)">', page.text)
        link = re.search(r'<a id="next-page" href="([^"]*)"', page.text)
        url = unescape(link.group(1)) if link else None
    assert seen == ids[::-1]
    denied = (await client.get("/ui/decisions?model=german-credit&decision=deny")).text
    listed = re.findall(r'<a href="/ui/decisions/([^"?/]+)">', denied)
    assert listed
    assert set(listed) < set(ids)
    assert "approve</td>" not in denied
    bad = await client.get("/ui/decisions?before=nonsense")
    assert bad.status_code == 422
    assert bad.headers["content-type"].startswith("text/html")


async def test_the_model_page_shows_the_schema_of_the_served_version(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    await sign_in(client, dev_key(tmp_path))
    page = await client.get("/ui/models/german-credit")
    assert page.status_code == 200
    models = (await client.get("/v1/models", headers=bearer(dev_key(tmp_path)))).json()
    served = next(m for m in models["models"] if m["name"] == "german-credit")
    assert served["version"] in page.text
    listed = re.findall(r'<tr data-feature="([^"]*)">', page.text)
    assert listed == [f["name"] for f in served["model_schema"]["features"]]
    assert (await client.get("/ui/models/no-such-model")).status_code == 404


def test_a_new_key_is_never_in_a_session_cookie() -> None:
    key, _ = new_api_key("someone", frozenset(Scope))
    cookie = Sessions(None, ttl_s=60).issue(key)
    assert key not in cookie


async def test_a_multiclass_decision_has_a_waterfall_per_class(tmp_path: Path) -> None:
    x, y = load_wine(return_X_y=True)
    params = {"objective": "multi:softprob", "num_class": 3, "max_depth": 3, "nthread": 1}
    booster = xgb.train(params, xgb.DMatrix(x, y), 20)
    booster.save_model(tmp_path / "wine.json")
    labels = ["barolo", "grignolino", "barbera"]
    schema = init_model_dir(tmp_path / "wine.json", tmp_path / "models" / "wine", classes=labels)
    settings = Settings(mode="embedded", data_dir=tmp_path / "data", models_dir=tmp_path / "models")
    async with asgi_client(create_app(settings)) as client:
        key = dev_key(tmp_path / "data")
        row: dict[str, object] = dict(zip(schema.feature_names, map(float, x[70]), strict=True))
        await decide(client, key, "wine-1", row)
        api = (await client.get("/v1/explanations/wine-1", headers=bearer(key))).json()
        await sign_in(client, key)
        for label in labels:
            page = (await client.get("/ui/decisions/wine-1", params={"class": label})).text
            assert re.findall(r'<option value="([^"]*)"', page) == labels
            assert f'<option value="{label}" selected>' in page
            shown = bars(page)
            base, fx = float(attribute(page, "data-base")), float(attribute(page, "data-fx"))
            assert base == api["base_value"][label]
            assert fx == api["prediction"]["margins"][label]
            assert abs(base + sum(v for _, v in shown) - fx) < 1e-5
