"""The browser tests' service and what they read off its pages (no fixtures: see conftest.py).

`start_service` runs the real service in embedded mode (`shapstream run`) with its state in a
directory of the session's own, and prepares what the tests read: the development key it
creates, a predict-only key from `shapstream keys create`, two denials and one approval of the
demo model with their explanations from the JSON API. The contract the pages are held to is
the console's DOM and URL contract (issue 11).
"""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest
from playwright.sync_api import ConsoleMessage, Page, Request, Response, WebError

from service.core.keys import DEV_KEY_FILE

ROOT = Path(__file__).resolve().parents[2]
SHAPSTREAM = str(Path(sys.executable).with_name("shapstream"))
# Debian's (`make setup` installs it with apt); CHROMIUM names another, as for setup.sh.
CHROMIUM = Path(os.environ.get("CHROMIUM") or "/usr/bin/chromium")
HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0
# Bars before the rest are grouped as "N other features": below the demo model's 20 features,
# so the grouped bar is always there to check.
MAX_BARS = 8
LENDER_NAME = "Browser Test Savings Bank"
LENDER_ADDRESS = "7 Test Lane, Testville"
SESSION_COOKIE = "shapstream_session"
OTHER = "other"
# A host the service never is: the Origin of a forged cross-site form.
EVIL_ORIGIN = "http://evil.example"

# The README's applicant ("Try it"): denied, probability ~0.94.
README_APPLICANT: dict[str, Any] = {
    "status_of_existing_checking_account": "... < 0 DM",
    "duration_in_month": 48,
    "credit_history": "existing credits paid back duly till now",
    "purpose": "radio/television",
    "credit_amount": 5951,
    "savings_account_and_bonds": "... < 100 DM",
    "present_employment_since": "1 <= ... < 4 years",
    "installment_rate_in_percentage_of_disposable_income": 2,
    "personal_status_and_sex": "female : divorced/separated/married",
    "other_debtors_or_guarantors": "none",
    "present_residence_since": 2,
    "property": "real estate",
    "age_in_years": 22,
    "other_installment_plans": "none",
    "housing": "own",
    "number_of_existing_credits_at_this_bank": 1,
    "job": "skilled employee / official",
    "number_of_people_being_liable_to_provide_maintenance_for": 1,
    "telephone": "none",
    "foreign_worker": "yes",
}
GERMAN_CREDIT = ROOT / "data" / "german_credit.csv"
# Rows of the German credit data (0 = the first applicant): approved at p ~0.02, denied at
# p ~0.86 by the demo model.
APPROVED_ROW = 0
DENIED_ROW = 4

# Saves a screenshot of a page under a label (the `shoot` fixture).
Shoot = Callable[[Page, str], Path]


@dataclass(frozen=True)
class Service:
    """The running service and the decisions made on it."""

    base_url: str
    dev_key: str
    predict_key: str
    denied: str  # the README's applicant
    denied_again: str  # another denial of the same model
    approved: str
    # GET /v1/explanations/{id} of each decision, as the API answered.
    explanations: dict[str, dict[str, Any]]
    # The GET /v1/models entry of the model that decided them.
    model: dict[str, Any]
    log: Path

    def url(self, path: str) -> str:
        return self.base_url + path

    def protected_features(self) -> list[dict[str, Any]]:
        features: list[dict[str, Any]] = self.model["model_schema"]["features"]
        return [f for f in features if f["protected"]]


def service_env(data_dir: Path) -> dict[str, str]:
    """This process's environment without its SHAPSTREAM_* settings (`make test` points them
    at Kafka and Cassandra), and the embedded mode's in `data_dir`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHAPSTREAM_")}
    return env | {
        # `shapstream keys` picks Cassandra when SHAPSTREAM_CASSANDRA_* is set: never here.
        "SHAPSTREAM_MODE": "embedded",
        "SHAPSTREAM_DATA_DIR": str(data_dir),
        "SHAPSTREAM_MODELS_DIR": str(ROOT / "models"),
        "SHAPSTREAM_CONSOLE_MAX_BARS": str(MAX_BARS),
        "SHAPSTREAM_CONSOLE_LENDER_NAME": LENDER_NAME,
        "SHAPSTREAM_CONSOLE_LENDER_ADDRESS": LENDER_ADDRESS,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def start_service(data_dir: Path, log: Path) -> Iterator[Service]:
    """`shapstream run` on a free port, ready, with its keys and decisions; stopped after."""
    env = service_env(data_dir)
    port = free_port()
    base_url = f"http://{HOST}:{port}"
    command = [SHAPSTREAM, "run", "--host", HOST, "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_ready(base_url, proc, log)
            yield prepare(base_url, data_dir, env, log)
        finally:
            stop(proc)


def wait_ready(base_url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"shapstream run exited with {proc.returncode} before it was ready:\n"
                f"{log_tail(log)}",
                pytrace=False,
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/readyz", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    pytest.fail(
        f"{base_url}/readyz did not answer 200 within {START_TIMEOUT_S:.0f} s:\n{log_tail(log)}",
        pytrace=False,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def log_tail(log: Path, lines: int = 30) -> str:
    text = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else []
    return "\n".join(f"  | {line}" for line in text) + f"\n(all of it in {log})"


def create_keys(env: dict[str, str], scopes_by_name: dict[str, str]) -> dict[str, str]:
    """Keys from `shapstream keys create` (run side by side), by name."""
    procs = {
        name: subprocess.Popen(
            [SHAPSTREAM, "keys", "create", "--name", name, "--scopes", scopes],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, scopes in scopes_by_name.items()
    }
    keys: dict[str, str] = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        if proc.returncode != 0:
            pytest.fail(f"shapstream keys create --name {name} failed:\n{err}", pytrace=False)
        keys[name] = out.strip()
    return keys


def german_credit_row(index: int) -> dict[str, Any]:
    """One applicant of the German credit data as request features (numbers as numbers)."""
    with GERMAN_CREDIT.open(newline="") as f:
        row = list(csv.DictReader(f))[index]
    row.pop("creditability")
    return {k: int(v) if v.lstrip("-").isdigit() else v for k, v in row.items()}


def prepare(base_url: str, data_dir: Path, env: dict[str, str], log: Path) -> Service:
    dev_key = (data_dir / DEV_KEY_FILE).read_text().strip()
    # The fixture's own key for its API calls, so that the access log holds no read by the
    # development key but the browser's.
    keys = create_keys(
        env,
        {
            "console-predict-only": "predict",
            "browser-tests": "predict,explanations:read",
        },
    )
    decisions = {
        "loan-2026-0001": (README_APPLICANT, "deny"),
        f"german-credit-row-{DENIED_ROW}": (german_credit_row(DENIED_ROW), "deny"),
        f"german-credit-row-{APPROVED_ROW}": (german_credit_row(APPROVED_ROW), "approve"),
    }
    headers = {"Authorization": f"Bearer {keys['browser-tests']}"}
    explanations: dict[str, dict[str, Any]] = {}
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
        for txn, (features, expected) in decisions.items():
            answer = client.post(
                "/v1/predictions", json={"transaction_id": txn, "features": features}
            )
            assert answer.status_code == 200, f"POST /v1/predictions {txn}: {answer.text}"
            decision = answer.json()["prediction"]["decision"]
            assert decision == expected, (
                f"the demo model now decides {decision} for {txn}, not {expected}: pick another "
                "applicant in tests/browser/console.py"
            )
        for txn in decisions:
            read = client.get(f"/v1/explanations/{txn}", params={"wait": 5})
            assert read.status_code == 200, f"GET /v1/explanations/{txn}: {read.text}"
            explanations[txn] = read.json()
        models = client.get("/v1/models")
        assert models.status_code == 200, models.text
    name = explanations["loan-2026-0001"]["model"]["name"]
    (model,) = [m for m in models.json()["models"] if m["name"] == name]
    denied, denied_again, approved = decisions
    return Service(
        base_url=base_url,
        dev_key=dev_key,
        predict_key=keys["console-predict-only"],
        denied=denied,
        denied_again=denied_again,
        approved=approved,
        explanations=explanations,
        model=model,
        log=log,
    )


@dataclass
class Watch:
    """What a browser context's pages did that they must not: a console error, an uncaught
    exception, a request to a host other than the service."""

    origin: str
    problems: list[str] = field(default_factory=list)
    # Pages expected to answer an error (a 403): Chromium logs "Failed to load resource" for
    # them, which is not the page's fault.
    error_pages: set[str] = field(default_factory=set)

    def expect_error_page(self, url: str) -> None:
        self.error_pages.add(url)

    def on_request(self, request: Request) -> None:
        parts = urlsplit(request.url)
        if parts.scheme in {"data", "blob"}:
            return
        if f"{parts.scheme}://{parts.netloc}" != self.origin:
            self.problems.append(f"request to another host: {request.method} {request.url}")

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type != "error":
            return
        where = message.location.get("url", "")
        if message.text.startswith("Failed to load resource") and where in self.error_pages:
            return
        page = message.page.url if message.page is not None else "?"
        self.problems.append(f"console error on {page}: {message.text} (at {where})")

    def on_web_error(self, error: WebError) -> None:
        page = error.page.url if error.page is not None else "?"
        self.problems.append(f"uncaught error on {page}: {error.error}")


def sign_in(page: Page, key: str, next_path: str | None = None) -> Response | None:
    """Through the sign-in form, as a person would; the answer of the page it lands on."""
    query = f"?next={quote(next_path, safe='')}" if next_path is not None else ""
    page.goto(f"/ui/sign-in{query}")
    page.fill("form#sign-in input#api-key", key)
    with page.expect_navigation() as landed:
        page.click("form#sign-in [type=submit]")
    return landed.value


def path_of(page: Page) -> str:
    return urlsplit(page.url).path


@dataclass(frozen=True)
class Bar:
    feature: str
    value: float
    label: str


@dataclass(frozen=True)
class Chart:
    """The waterfall of a binary decision as its page draws it."""

    base: float
    fx: float
    axis_min: float
    axis_max: float
    bars: list[Bar]
    table_features: list[str]


def read_chart(page: Page) -> Chart:
    # The contract says section.waterfall; only its class is relied on.
    charts = page.locator(".waterfall svg.waterfall-chart")
    assert charts.count() == 1, "a binary decision has one waterfall"
    chart = charts.first

    def number(name: str) -> float:
        value = chart.get_attribute(name)
        assert value is not None, f"svg.waterfall-chart has no {name}"
        return float(value)

    bars = chart.locator("g.bar").evaluate_all(
        "bars => bars.map(b => [b.getAttribute('data-feature'), b.getAttribute('data-value'), "
        "b.getAttribute('data-label')])"
    )
    rows = page.locator("table#waterfall-table tbody tr[data-feature]").evaluate_all(
        "rows => rows.map(r => r.getAttribute('data-feature'))"
    )
    return Chart(
        base=number("data-base"),
        fx=number("data-fx"),
        axis_min=number("data-axis-min"),
        axis_max=number("data-axis-max"),
        bars=[Bar(feature, float(value), label) for feature, value, label in bars],
        table_features=list(rows),
    )


def texts(page: Page, selector: str) -> list[str]:
    """The visible text of each element `selector` matches, whitespace collapsed."""
    found: list[str] = page.locator(selector).evaluate_all(
        "els => els.map(e => e.innerText.replace(/\\s+/g, ' ').trim())"
    )
    return found
