"""The web console as a browser sees it, held to its DOM and URL contract (issue 11): the
waterfall adds up to the decision's margin, reasons and notices say what the API says and no
protected attribute, sessions, scopes and CSRF are enforced, and the pages work from the
keyboard without a console error or a request to another host."""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from playwright.sync_api import BrowserContext, Page

from service.core.keys import DEV_KEY_NAME
from tests.browser.console import (
    EVIL_ORIGIN,
    LENDER_NAME,
    MAX_BARS,
    OTHER,
    SESSION_COOKIE,
    Service,
    Shoot,
    Watch,
    path_of,
    read_chart,
    sign_in,
    texts,
)

TOLERANCE = 1e-6
TAB_PRESSES = 40


def decision_path(txn: str) -> str:
    return f"/ui/decisions/{txn}"


def test_waterfall_bars_add_up_to_the_decisions_margin(
    page: Page, service: Service, shoot: Shoot
) -> None:
    sign_in(page, service.dev_key)
    page.goto(decision_path(service.denied))
    shoot(page, "decision")
    explanation = service.explanations[service.denied]
    chart = read_chart(page)
    bars = chart.bars

    # One row per bar, in the same order; the features by |phi|, largest first, then at most
    # one "other" bar, last.
    assert [b.feature for b in bars] == chart.table_features
    features = [b for b in bars if b.feature != OTHER]
    others = [b for b in bars if b.feature == OTHER]
    assert len(features) <= MAX_BARS
    assert len(bars) <= MAX_BARS + 1
    assert len(others) <= 1
    assert not others or bars[-1].feature == OTHER
    magnitudes = [abs(b.value) for b in features]
    assert magnitudes == sorted(magnitudes, reverse=True)

    # Each feature bar is the API's attribution; "other" carries the rest, which are smaller.
    attributions: dict[str, float] = explanation["attributions"]
    assert len({b.feature for b in features}) == len(features)
    for bar in features:
        assert math.isclose(bar.value, attributions[bar.feature], abs_tol=TOLERANCE), bar
    hidden = set(attributions) - {b.feature for b in features}
    assert hidden, f"{len(attributions)} features and at most {MAX_BARS} bars: some are grouped"
    (other,) = others
    assert math.isclose(other.value, sum(attributions[f] for f in hidden), abs_tol=TOLERANCE)
    assert str(len(hidden)) in other.label, other.label
    assert max(abs(attributions[f]) for f in hidden) <= min(magnitudes)

    # base + bars = f(x) = the margin the model decided with.
    assert math.isclose(chart.base, explanation["base_value"], abs_tol=TOLERANCE)
    assert math.isclose(chart.base + sum(b.value for b in bars), chart.fx, abs_tol=TOLERANCE)
    assert math.isclose(chart.fx, explanation["prediction"]["margin"], abs_tol=TOLERANCE)


def test_decision_page_states_the_decision_and_its_verified_record(
    page: Page, service: Service
) -> None:
    sign_in(page, service.dev_key)
    for txn in (service.denied, service.approved):
        page.goto(decision_path(txn))
        prediction = service.explanations[txn]["prediction"]
        decision = page.locator("#decision")
        assert decision.get_attribute("data-decision") == prediction["decision"]
        probability = float(decision.get_attribute("data-probability") or "nan")
        assert math.isclose(probability, prediction["probability"], abs_tol=TOLERANCE)
        assert page.locator("#verified").get_attribute("data-verified") == "true"


def test_reasons_on_the_page_are_the_apis_in_order(page: Page, service: Service) -> None:
    sign_in(page, service.dev_key)
    page.goto(decision_path(service.denied))
    reasons = service.explanations[service.denied]["reasons"]
    assert reasons, "the README's applicant is denied with reasons"
    shown = texts(page, "ol#reasons > li > .reason-text")
    families = page.locator("ol#reasons > li").evaluate_all(
        "items => items.map(li => li.getAttribute('data-family'))"
    )
    assert list(zip(shown, families, strict=True)) == [(r["reason"], r["family"]) for r in reasons]

    page.goto(decision_path(service.approved))
    assert service.explanations[service.approved]["reasons"] == []
    assert page.locator("ol#reasons > li").count() == 0


def _never_shown(service: Service, txn: str) -> list[str]:
    """What a notice must not say: the protected features' names and descriptions, and the
    applicant's value of each that is a word rather than a number or yes/no."""
    features: dict[str, Any] = service.explanations[txn]["features"]
    found: list[str] = []
    for feature in service.protected_features():
        found += [feature["name"], feature["description"]]
        value = features.get(feature["name"])
        if isinstance(value, str) and len(value) > 3:
            found.append(value)
    return found


def test_notice_lists_the_reasons_and_no_protected_attribute(
    page: Page, service: Service, shoot: Shoot
) -> None:
    assert service.protected_features(), "the demo model's schema marks protected features"
    sign_in(page, service.dev_key)
    for txn in (service.denied, service.approved):
        page.goto(f"{decision_path(txn)}/notice")
        shoot(page, f"notice-{txn}")
        assert page.locator("article#notice").count() == 1
        # Hidden text too: textContent, not what happens to be displayed.
        text = page.evaluate("document.documentElement.textContent").casefold()
        for forbidden in _never_shown(service, txn):
            assert forbidden.casefold() not in text, f"the notice of {txn} shows {forbidden!r}"
        assert LENDER_NAME.casefold() in text
        reasons = [r["reason"] for r in service.explanations[txn]["reasons"]]
        assert texts(page, "article#notice ol#notice-reasons > li") == reasons
        approved = txn == service.approved
        assert page.locator("p#no-adverse-action").count() == (1 if approved else 0)


def test_every_page_loads_without_console_errors_or_foreign_requests(
    page: Page, service: Service, watch: Watch, shoot: Shoot
) -> None:
    # `/` leads into the console.
    page.goto("/")
    assert path_of(page).startswith("/ui/")
    page.goto("/ui/sign-in")
    shoot(page, "sign-in")

    # Signed in without `next`: the recent decisions, ours among them.
    sign_in(page, service.dev_key)
    assert path_of(page) == "/ui/decisions"
    links = page.locator('table#decisions tbody tr td a[href^="/ui/decisions/"]').evaluate_all(
        "links => links.map(a => a.getAttribute('href'))"
    )
    for txn in (service.denied, service.denied_again, service.approved):
        assert decision_path(txn) in links
    shoot(page, "recent")

    # The header's search opens a decision; its notice link opens the notice.
    page.fill("input#search", service.denied)
    with page.expect_navigation():
        page.press("input#search", "Enter")
    assert path_of(page) == decision_path(service.denied)
    shoot(page, "decision")
    with page.expect_navigation():
        page.click("a#notice-link")
    assert path_of(page) == f"{decision_path(service.denied)}/notice"
    shoot(page, "notice")

    name = service.model["name"]
    page.goto(f"/ui/models/{name}")
    features = page.locator("table#features tbody tr[data-feature]").evaluate_all(
        "rows => rows.map(r => r.getAttribute('data-feature'))"
    )
    assert features == [f["name"] for f in service.model["model_schema"]["features"]]
    assert page.locator("ul#versions > li").count() >= 1
    shoot(page, "model")

    assert watch.problems == []


def test_a_page_without_a_session_redirects_to_sign_in(page: Page, service: Service) -> None:
    path = decision_path(service.denied)
    page.goto(path)
    parts = urlsplit(page.url)
    assert parts.path == "/ui/sign-in"
    assert parse_qs(parts.query)["next"] == [path]
    assert page.locator('form#sign-in input[name="next"]').get_attribute("value") == path


def test_a_key_without_explanations_read_gets_a_403_page(
    page: Page, service: Service, watch: Watch, shoot: Shoot
) -> None:
    path = decision_path(service.denied)
    watch.expect_error_page(service.url(path))
    sign_in(page, service.predict_key, next_path=path)
    answer = page.goto(path)
    assert answer is not None
    assert answer.status == 403
    assert "Not allowed" in page.locator("h1").inner_text()
    assert "explanations:read" in page.locator("body").inner_text()
    shoot(page, "forbidden")


def test_tab_reaches_the_search_then_the_waterfall_table(page: Page, service: Service) -> None:
    sign_in(page, service.dev_key)
    page.goto(decision_path(service.denied))
    reached: list[str] = []
    for _ in range(TAB_PRESSES):
        page.keyboard.press("Tab")
        reached.append(page.evaluate("document.activeElement ? document.activeElement.id : ''"))
        if reached[-1] == "waterfall-table":
            break
    assert "search" in reached, f"ids focused by {len(reached)} Tabs: {reached}"
    assert "waterfall-table" in reached, f"ids focused by {len(reached)} Tabs: {reached}"
    assert reached.index("search") < reached.index("waterfall-table")

    # The skip link jumps there at once.
    page.goto(decision_path(service.denied))
    page.focus("a#skip-to-table")
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "waterfall-table"


def test_decisions_of_one_model_share_the_waterfalls_axis(page: Page, service: Service) -> None:
    sign_in(page, service.dev_key)
    charts = []
    for txn in (service.denied, service.denied, service.denied_again):
        page.goto(decision_path(txn))
        charts.append(read_chart(page))
    axes = [(c.axis_min, c.axis_max) for c in charts]
    assert axes[0] == axes[1] == axes[2]
    # Two decisions that differ, both on the axis.
    assert charts[0].fx != charts[2].fx
    for chart in charts:
        assert chart.axis_min < min(chart.base, chart.fx)
        assert max(chart.base, chart.fx) < chart.axis_max


def test_after_sign_out_a_decision_page_asks_to_sign_in_again(
    page: Page, context: BrowserContext, service: Service
) -> None:
    path = decision_path(service.denied)
    sign_in(page, service.dev_key, next_path=path)
    assert path_of(page) == path
    with page.expect_navigation():
        page.click("form#sign-out [type=submit]")
    assert path_of(page) == "/ui/sign-in"
    assert SESSION_COOKIE not in {c["name"] for c in context.cookies()}
    page.goto(path)
    assert path_of(page) == "/ui/sign-in"
    assert parse_qs(urlsplit(page.url).query)["next"] == [path]


def _clears_the_session(answer: httpx.Response) -> bool:
    return any(
        value.split("=", 1)[0].strip() == SESSION_COOKIE
        for value in answer.headers.get_list("set-cookie")
    )


def test_forms_posted_from_another_origin_are_refused(
    page: Page, context: BrowserContext, service: Service
) -> None:
    path = decision_path(service.denied)
    sign_in(page, service.dev_key, next_path=path)
    (session,) = [c["value"] for c in context.cookies() if c["name"] == SESSION_COOKIE]
    csrf = page.locator('form#sign-out input[name="csrf"]').get_attribute("value")
    assert csrf
    cookie = {"Cookie": f"{SESSION_COOKIE}={session}"}
    with httpx.Client(base_url=service.base_url, follow_redirects=False) as client:
        # Even with the right token: the Origin is not the service's.
        forged = client.post(
            "/ui/sign-out", data={"csrf": csrf}, headers={**cookie, "Origin": EVIL_ORIGIN}
        )
        assert forged.status_code == 403
        assert not _clears_the_session(forged)
        # Without the token (no Origin header at all, as some clients send): refused too.
        tokenless = client.post("/ui/sign-out", data={}, headers=cookie)
        assert tokenless.status_code >= 400
        assert not _clears_the_session(tokenless)
        # Signing someone in from another site (login CSRF): refused, no session given.
        login = client.post(
            "/ui/sign-in",
            data={"api_key": service.dev_key, "next": "/ui/decisions"},
            headers={"Origin": EVIL_ORIGIN},
        )
        assert login.status_code == 403
        assert not _clears_the_session(login)
    # Still signed in.
    page.goto(path)
    assert path_of(page) == path


def test_the_page_read_is_in_the_access_log(page: Page, service: Service) -> None:
    txn = service.denied_again

    def reads() -> int:
        answer = httpx.get(
            service.url("/v1/audit/access-log"),
            headers={"Authorization": f"Bearer {service.dev_key}"},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        return sum(
            1
            for e in answer.json()["entries"]
            if (e["key_name"], e["action"], e["target"]) == (DEV_KEY_NAME, "explanation.read", txn)
        )

    before = reads()
    sign_in(page, service.dev_key)
    page.goto(decision_path(txn))
    assert page.locator("#decision").count() == 1
    # Recorded by the time the page answered; a moment's grace for a write behind.
    for _ in range(50):
        if reads() > before:
            break
        page.wait_for_timeout(100)
    assert reads() > before, f"no explanation.read of {txn} by {DEV_KEY_NAME!r} in the log"


def test_population_page_of_the_denied_decisions_model_draws_its_charts(
    page: Page, service: Service, shoot: Shoot
) -> None:
    model = service.explanations[service.denied]["model"]
    name, version = model["name"], model["version"]
    api = f"/v1/models/{name}/versions/{version}"
    auth = {"Authorization": f"Bearer {service.dev_key}"}
    decided = len(service.explanations)
    with httpx.Client(base_url=service.base_url, headers=auth, timeout=10) as client:
        # The worker counts decisions in the population aggregates just after their records.
        for _ in range(100):
            importance = client.get(f"{api}/importance")
            assert importance.status_code == 200, importance.text
            if importance.json()["decisions"] == decided:
                break
            page.wait_for_timeout(100)
        reasons = client.get(f"{api}/reasons").json()
    assert importance.json()["decisions"] == decided
    (output,) = importance.json()["outputs"]

    # From the model page's link, as a person would get there.
    sign_in(page, service.dev_key)
    page.goto(f"/ui/models/{name}?version={version}")
    with page.expect_navigation():
        page.click("a#population-link")
    assert path_of(page) == f"/ui/models/{name}/population"
    assert parse_qs(urlsplit(page.url).query)["version"] == [version]
    shoot(page, "population")

    bars = page.locator("svg.importance-chart g.imp-bar").evaluate_all(
        "bars => bars.map(b => [b.getAttribute('data-feature'), b.getAttribute('data-value')])"
    )
    assert [(f, float(v)) for f, v in bars] == [
        (f["feature"], f["mean_abs"]) for f in output["features"]
    ]
    features = len(output["features"])
    for chart in ("svg.importance-chart", "svg.swarm-chart"):
        box = page.locator(chart).bounding_box()
        assert box is not None, chart
        assert box["width"] > 0, chart
        assert box["height"] > 0, chart
    assert page.locator("svg.swarm-chart g.swarm-row").count() == features
    assert page.locator("svg.swarm-chart g.strip.window rect.cell").count() > 0
    assert page.locator("table#drift-table tbody tr").count() == features
    assert reasons["denials"] > 0
    assert page.locator("svg.reason-chart").count() == len(reasons["families"])
    assert page.locator("table#reasons-table tbody tr").count() == len(reasons["days"])
