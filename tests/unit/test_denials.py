"""Refused attempts in the access log: who tried, in bounded batches off the request path."""

import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from service.adapters.sqlite_access import SqliteAccessStore
from service.adapters.sqlite_store import SqliteStore
from service.app import create_app
from service.core.access import NO_VALID_KEY, AccessEntry, Action, Scope
from service.core.denials import (
    MAX_BY_CLIENT,
    MAX_ITEMIZED,
    MAX_PATH,
    Attempt,
    DenialLog,
    request_line,
)
from service.settings import Settings
from tests.api_client import MODELS, asgi_client, bearer, dev_key, german_rows
from tests.polling import until
from tests.unit.test_auth import put_key

# Entries a window may write, whatever was noted in it.
WINDOW_BOUND = MAX_ITEMIZED + MAX_BY_CLIENT + len(Action)
COUNT = re.compile(r": (\d+) attempts in [\d.]+ s$")


class MemoryLog:
    """An access store's `record_many`, kept in memory; fails while `failing` is set."""

    def __init__(self) -> None:
        self.batches: list[list[AccessEntry]] = []
        self.failing = False

    async def record_many(self, entries: Sequence[AccessEntry]) -> None:
        if self.failing:
            raise OSError("the disk is gone")
        self.batches.append(list(entries))

    @property
    def entries(self) -> list[AccessEntry]:
        return [entry for batch in self.batches for entry in batch]


def attempts(entry: AccessEntry) -> int:
    """How many attempts an entry stands for."""
    found = COUNT.search(entry.target)
    return int(found.group(1)) if found else 1


def denial_log(store: MemoryLog, interval_s: float = 60.0) -> DenialLog:
    # A window of a minute: only `flush` writes, so the test decides when.
    return DenialLog(store, interval_s=interval_s)  # type: ignore[arg-type]


def bad_key(n: int, client: str = "192.0.2.7", path: str = "/v1/predictions") -> Attempt:
    del n  # the key itself is never seen here, nor its hash
    return Attempt(
        Action.DENIED_UNAUTHENTICATED, NO_VALID_KEY, f"POST {path}", client, "unknown key"
    )


async def test_a_flood_from_one_client_is_one_entry_per_window() -> None:
    store = MemoryLog()
    log = denial_log(store)
    for n in range(10_000):
        log.note(bad_key(n))
    await log.flush()
    (entry,) = store.entries
    assert entry.key_name == NO_VALID_KEY
    assert entry.action is Action.DENIED_UNAUTHENTICATED
    assert entry.target.startswith("POST /v1/predictions from 192.0.2.7 (unknown key): ")
    assert attempts(entry) == 10_000
    assert log.writes == 1
    await log.close()


async def test_a_window_writes_a_bounded_number_of_entries_and_counts_every_attempt() -> None:
    store = MemoryLog()
    log = denial_log(store)
    # Distinct paths (transaction ids probed) from many clients: the worst case for itemizing.
    noted = 0
    for client in range(500):
        for n in range(40):
            log.note(bad_key(n, f"198.51.100.{client}", f"/v1/explanations/probe-{client}-{n}"))
            noted += 1
    assert log.pending <= WINDOW_BOUND
    await log.flush()
    assert len(store.entries) <= WINDOW_BOUND
    assert sum(map(attempts, store.entries)) == noted
    itemized = [e for e in store.entries if "not itemized" not in e.target]
    assert len(itemized) == MAX_ITEMIZED
    by_client = [e for e in store.entries if "not itemized, from" in e.target]
    assert len(by_client) == MAX_BY_CLIENT
    (rest,) = [e for e in store.entries if e.target.startswith("requests not itemized:")]
    assert rest.key_name == "(any)"
    await log.close()


async def test_a_failed_write_is_kept_for_the_next_window_within_the_bound() -> None:
    store = MemoryLog()
    log = denial_log(store)
    store.failing = True
    for round_ in range(5):
        for n in range(200):
            log.note(bad_key(n, f"203.0.113.{n}", f"/v1/explanations/r{round_}-{n}"))
        await log.flush()
        assert log.pending <= WINDOW_BOUND
    store.failing = False
    await log.flush()
    assert len(store.entries) <= WINDOW_BOUND
    assert sum(map(attempts, store.entries)) == 5 * 200
    await log.close()


async def test_noted_attempts_are_written_in_the_background_and_at_close() -> None:
    store = MemoryLog()
    log = denial_log(store, interval_s=0.05)
    log.note(bad_key(1))
    await until(lambda: len(store.entries) == 1, timeout_s=5)
    log.note(bad_key(2, client="192.0.2.99"))
    await log.close()
    assert [attempts(e) for e in store.entries] == [1, 1]
    assert store.entries[1].target.startswith("POST /v1/predictions from 192.0.2.99")


def test_a_long_path_is_cut() -> None:
    line = request_line("GET", "/v1/" + "x" * 10_000)
    assert len(line) == len("GET ") + MAX_PATH + len("...")


async def test_noting_is_cheap() -> None:
    log = denial_log(MemoryLog())
    n = 100_000
    started = time.perf_counter()
    for i in range(n):
        log.note(bad_key(i, client=f"192.0.2.{i % 200}"))
    per_note_us = (time.perf_counter() - started) / n * 1e6
    print(f"\nDenialLog.note: {per_note_us:.2f} us per refused request (in memory, no I/O)")
    # Generous for a loaded 2-core machine; measured ~2 us idle.
    assert per_note_us < 50
    await log.close()


def settings_for(data_dir: Path) -> Settings:
    return Settings(mode="embedded", data_dir=data_dir, models_dir=MODELS)


async def logged(data_dir: Path) -> list[AccessEntry]:
    """The access log of a stopped embedded service."""
    store = await SqliteStore.from_settings(settings_for(data_dir))
    try:
        access = SqliteAccessStore(store)
        now = datetime.now(UTC)
        return await access.entries(now - timedelta(days=1), now + timedelta(minutes=1), 10_000)
    finally:
        await store.close()


async def test_refused_requests_are_in_the_access_log_with_the_key_name(tmp_path: Path) -> None:
    reader = await put_key(tmp_path, "loan-ui", frozenset({Scope.EXPLANATIONS_READ}))
    async with asgi_client(create_app(settings_for(tmp_path))) as client:
        assert (await client.get("/v1/explanations/t-1")).status_code == 401
        bad = bearer("ssk_not-a-key")
        assert (await client.get("/v1/explanations/t-2", headers=bad)).status_code == 401
        assert (await client.get("/v1/audit/export", headers=bearer(reader))).status_code == 403
        assert (
            await client.get("/v1/explanations/no-such-txn", headers=bearer(reader))
        ).status_code == 404
        # The same refusal again within the window: counted in the same entry.
        assert (await client.get("/v1/explanations/t-1")).status_code == 401
    # The service wrote what was left when it stopped.
    found = {(e.action, e.key_name, e.target) for e in await logged(tmp_path)}
    client_host = "127.0.0.1"
    assert {
        (
            Action.DENIED_UNAUTHENTICATED,
            NO_VALID_KEY,
            f"GET /v1/explanations/t-2 from {client_host} (unknown key)",
        ),
        (
            Action.DENIED_FORBIDDEN,
            "loan-ui",
            f"GET /v1/audit/export from {client_host} (lacks audit:export)",
        ),
        (
            Action.DENIED_NOT_FOUND,
            "loan-ui",
            f"GET /v1/explanations/no-such-txn from {client_host}",
        ),
    } <= found
    (twice,) = [t for a, _, t in found if "/v1/explanations/t-1 " in t]
    assert re.fullmatch(
        rf"GET /v1/explanations/t-1 from {client_host} \(no key\): 2 attempts in [\d.]+ s", twice
    )
    assert len(found) == 4


async def test_successful_requests_write_nothing_and_a_flood_is_batched(tmp_path: Path) -> None:
    async with asgi_client(create_app(settings_for(tmp_path))) as client:
        key = bearer(dev_key(tmp_path))
        for features in german_rows(20):
            answer = await client.post("/v1/predictions", json={"features": features}, headers=key)
            assert answer.status_code == 200, answer.text
        metrics = (await client.get("/metrics")).text
        assert "shapstream_access_denials_total{" not in metrics
        started = time.perf_counter()
        refused = await flood(client, 2_000)
        flood_s = time.perf_counter() - started
        assert refused == 2_000
        metrics = (await client.get("/metrics")).text
        assert 'shapstream_access_denials_total{action="denied.unauthenticated"} 2000.0' in metrics
    entries = await logged(tmp_path)
    # Twenty decisions, no reads: not one entry. The flood: one entry per window it spanned.
    assert all(e.action is Action.DENIED_UNAUTHENTICATED for e in entries)
    assert sum(map(attempts, entries)) == 2_000
    assert len(entries) <= flood_s + 2
    print(f"\n2,000 bad-key requests in {flood_s:.2f} s: {len(entries)} access-log entries")


async def flood(client: httpx.AsyncClient, count: int) -> int:
    refused = 0
    for n in range(count):
        headers = bearer(f"ssk_made-up-{n}")
        answer = await client.post("/v1/predictions", json={"features": {}}, headers=headers)
        refused += answer.status_code == 401
    return refused


@pytest.mark.parametrize("name", ["(no valid key)", "(any)"])
def test_placeholders_cannot_be_key_names(name: str) -> None:
    from service.core.access import KEY_NAME

    assert KEY_NAME.fullmatch(name) is None
