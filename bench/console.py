"""The console's decision page in Chromium, against the JSON API it is made from.

    .venv/bin/python -m bench.console [--runs 20] [--warmup 3]

Starts `shapstream run` (embedded mode, the demo model) with its state in a temporary
directory, posts the README's applicant (a denial: the page has its waterfall, reasons and
notice link), and signs Debian's Chromium (headless; CHROMIUM names another) in through the
form. Each run then opens, in a new browser context (nothing cached, as for a reader opening a
decision), the decision page `/ui/decisions/{id}`, and again in the same context (its style
sheet and script cached); and, as the baseline measured the same way in the same run, the JSON
the page shows, `GET /v1/explanations/{id}` with the key as a header. Page and API alternate
within each run, so the noise of a shared machine falls on both alike.

Both are timed by Chromium's navigation timing (`performance.getEntriesByType('navigation')`):
load is navigation start to loadEventEnd (for the page: its HTML, style sheet, script and
layout); server is requestStart to responseStart, the time to the first byte of the HTML or
JSON (the service's own work, on loopback). Prints median and p95 over the runs and the ratios
page/API.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import Browser, BrowserContext, sync_playwright

from bench.procs import ROOT, SHAPSTREAM, free_port, running, wait_http
from service.core.keys import DEV_KEY_FILE

OUT = ROOT / "bench" / "out"
CHROMIUM = Path(os.environ.get("CHROMIUM") or "/usr/bin/chromium")
TXN = "bench-console-0001"
# The README's applicant ("Try it"): denied, probability ~0.94.
APPLICANT: dict[str, Any] = {
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
# What the navigation timing gives, in ms: load, server, and the answer's status.
TIMING = """() => {
  const [n] = performance.getEntriesByType('navigation');
  return [n.loadEventEnd - n.startTime, n.responseStart - n.requestStart, n.responseStatus];
}"""
LOADED = "performance.getEntriesByType('navigation')[0].loadEventEnd > 0"
PAGE, API = "decision page", "JSON API"
FIRST, AGAIN = "first open", "opened again"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Timings:
    load_ms: list[float] = field(default_factory=list)
    server_ms: list[float] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def open_timed(context: BrowserContext, url: str, into: Timings) -> None:
    """Open `url` in the context's page and add its navigation timing to `into`."""
    page = context.pages[0] if context.pages else context.new_page()
    page.goto(url, wait_until="load")
    page.wait_for_function(LOADED)
    load_ms, server_ms, status = page.evaluate(TIMING)
    if status != 200:
        sys.exit(f"{url} answered {status}, not 200 (is the console there?)")
    into.load_ms.append(load_ms)
    into.server_ms.append(server_ms)


def signed_in_state(browser: Browser, base_url: str, key: str) -> Any:
    """A browser's cookies after signing in through the form, for new contexts to start with."""
    context = browser.new_context(base_url=base_url)
    try:
        page = context.new_page()
        page.goto(f"/ui/sign-in?next=/ui/decisions/{TXN}")
        page.fill("input#api-key", key)
        with page.expect_navigation():
            page.click("form#sign-in [type=submit]")
        if page.locator("#decision").count() != 1:
            sys.exit(f"signed in, {page.url} shows no #decision: is the console's page there?")
        return context.storage_state()
    finally:
        context.close()


def measure(
    browser: Browser, base_url: str, key: str, runs: int, warmup: int
) -> dict[tuple[str, str], Timings]:
    state = signed_in_state(browser, base_url, key)
    targets = {
        PAGE: (f"{base_url}/ui/decisions/{TXN}", {"storage_state": state}),
        API: (
            f"{base_url}/v1/explanations/{TXN}",
            {"extra_http_headers": {"Authorization": f"Bearer {key}"}},
        ),
    }
    found = {(target, when): Timings() for target in targets for when in (FIRST, AGAIN)}
    for index in range(warmup + runs):
        measured = index >= warmup
        for target, (url, options) in targets.items():
            context = browser.new_context(**options)
            try:
                first, again = Timings(), Timings()
                open_timed(context, url, first)
                open_timed(context, url, again)
            finally:
                context.close()
            if measured:
                for when, got in ((FIRST, first), (AGAIN, again)):
                    found[target, when].load_ms += got.load_ms
                    found[target, when].server_ms += got.server_ms
        if measured:
            page, api = found[PAGE, FIRST], found[API, FIRST]
            _say(
                f"run {index - warmup + 1}/{runs}: page load {page.load_ms[-1]:.1f} ms "
                f"(server {page.server_ms[-1]:.1f}), API load {api.load_ms[-1]:.1f} ms "
                f"(server {api.server_ms[-1]:.1f})"
            )
        else:
            _say(f"warm-up {index + 1}/{warmup}")
    return found


def report(found: dict[tuple[str, str], Timings], runs: int) -> None:
    print(f"\nconsole decision page vs the JSON API it shows, Chromium, {runs} runs (ms)")
    print(f"{'':28s} {'load p50':>9s} {'load p95':>9s} {'server p50':>11s} {'server p95':>11s}")
    for (target, when), t in found.items():
        load = f"{median(t.load_ms):9.2f} {percentile(t.load_ms, 0.95):9.2f}"
        server = f"{median(t.server_ms):11.2f} {percentile(t.server_ms, 0.95):11.2f}"
        print(f"{target + ', ' + when:28s} {load} {server}")
    print()
    for when in (FIRST, AGAIN):
        page, api = found[PAGE, when], found[API, when]
        print(
            f"page/API, {when}: load {median(page.load_ms) / median(api.load_ms):.2f}x, "
            f"server {median(page.server_ms) / median(api.server_ms):.2f}x (medians)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="runs before measuring")
    args = parser.parse_args()
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be positive, --warmup not negative")
    if not os.access(CHROMIUM, os.X_OK):
        sys.exit(f"Chromium is not at {CHROMIUM}: run `make setup`, or set CHROMIUM")

    OUT.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="bench-console-") as data_dir:
        env = {
            "SHAPSTREAM_DATA_DIR": data_dir,
            "SHAPSTREAM_MODELS_DIR": str(ROOT / "models"),
            "SHAPSTREAM_LOG_LEVEL": "WARNING",
        }
        log = OUT / "console-service.log"
        command = [SHAPSTREAM, "run", "--host", "127.0.0.1", "--port", str(port)]
        with running(command, env, log) as service:
            _say(f"waiting for shapstream run (pid {service.pid}) on port {port}")
            wait_http(port, "/readyz", proc=service, log=log)
            key = (Path(data_dir) / DEV_KEY_FILE).read_text().strip()
            auth = {"Authorization": f"Bearer {key}"}
            with httpx.Client(base_url=base_url, headers=auth, timeout=30) as client:
                body = {"transaction_id": TXN, "features": APPLICANT}
                client.post("/v1/predictions", json=body).raise_for_status()
                client.get(f"/v1/explanations/{TXN}", params={"wait": 5}).raise_for_status()
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
                )
                try:
                    found = measure(browser, base_url, key, args.runs, args.warmup)
                finally:
                    browser.close()
    report(found, args.runs)


if __name__ == "__main__":
    main()
