"""The web console in Chromium: the real service in embedded mode, driven through Playwright.

Once per session: `shapstream run` on a free port with its state in a temporary directory, its
keys and three decisions (tests/browser/console.py), and Debian's Chromium, headless. Each test
gets a fresh browser context (no cookies) whose pages are watched: a console error, an uncaught
exception or a request to any host but the service fails the test at teardown. Screenshots and
the service's log go to $SHAPSTREAM_TEST_OUTPUT/browser, else .pytest-output/browser in the
checkout; the run's summary names the folder.

Every test here carries the `browser` marker (`pytest -m browser` runs only them). Chromium
missing fails them, saying to run `make setup`: they never skip.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from tests.browser.console import CHROMIUM, ROOT, Service, Shoot, Watch, start_service

HERE = Path(__file__).resolve().parent
# Kept short: a missing element fails within seconds, not Playwright's default 30 s.
TIMEOUT_MS = 5_000
NAVIGATION_TIMEOUT_MS = 15_000
OUTPUT_KEY = pytest.StashKey[Path]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "browser: the web console in Chromium (tests/browser)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/browser carries the `browser` marker."""
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.browser)


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    output = config.stash.get(OUTPUT_KEY, None)
    if output is not None:
        terminalreporter.write_line(f"browser tests: screenshots and service log in {output}")


@pytest.fixture(scope="session")
def output_dir(request: pytest.FixtureRequest) -> Path:
    """Where screenshots and the service's log go; the previous run's are removed."""
    root = os.environ.get("SHAPSTREAM_TEST_OUTPUT")
    output = (Path(root) if root else ROOT / ".pytest-output") / "browser"
    output.mkdir(parents=True, exist_ok=True)
    for old in [*output.glob("*.png"), output / "service.log"]:
        old.unlink(missing_ok=True)
    request.config.stash[OUTPUT_KEY] = output
    return output


# Module-scoped, not session: Playwright's sync API runs an event loop in this thread while it
# is open, which would break every pytest-asyncio test after this package in the same run.
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium, headless (`--no-sandbox`: the tests may run as root)."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"Chromium is not at {CHROMIUM}: run `make setup` (it installs Debian's chromium "
            "with apt), or set CHROMIUM to a Chromium binary",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def service(
    browser: Browser, tmp_path_factory: pytest.TempPathFactory, output_dir: Path
) -> Iterator[Service]:
    """The service with its keys and decisions (after the browser: a missing Chromium fails
    before the service is started)."""
    data_dir = tmp_path_factory.mktemp("console-data")
    with start_service(data_dir, output_dir / "service.log") as running:
        yield running


@pytest.fixture
def watch(service: Service) -> Watch:
    return Watch(origin=service.base_url)


@pytest.fixture
def context(browser: Browser, service: Service, watch: Watch) -> Iterator[BrowserContext]:
    """A fresh context (no session) on the service, watched; its problems fail the test."""
    context = browser.new_context(base_url=service.base_url)
    context.set_default_timeout(TIMEOUT_MS)
    context.set_default_navigation_timeout(NAVIGATION_TIMEOUT_MS)
    context.on("request", watch.on_request)
    context.on("console", watch.on_console)
    context.on("weberror", watch.on_web_error)
    try:
        yield context
    finally:
        context.close()
    if watch.problems:
        pytest.fail("\n".join(watch.problems), pytrace=False)


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()


@pytest.fixture
def shoot(request: pytest.FixtureRequest, output_dir: Path) -> Shoot:
    """Saves a full-page screenshot as <test>-<label>.png in the output folder."""
    test = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)

    def save(page: Page, label: str) -> Path:
        path = output_dir / f"{test}-{label}.png"
        page.screenshot(path=path, full_page=True)
        return path

    return save
