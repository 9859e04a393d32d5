"""Verifying presented API keys against the access store, with a short in-process cache."""

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from service.core.access import MAX_KEY_LENGTH, ApiKey, Scope, hash_key, new_api_key, to_millis
from service.core.breaker import Guard
from service.core.ports import AccessStore
from service.errors import Unavailable

# POST /v1/predictions is the hot path (a fraction of a millisecond of work): a store read per
# request would cost more than the decision itself. A verified key is trusted for this long,
# so a key removed from the store keeps working for at most this many seconds per process.
DEFAULT_CACHE_S = 30.0
# Bounds the memory a stream of made-up keys can take; the oldest entry goes first.
CACHE_MAX_ENTRIES = 10_000


@dataclass(frozen=True, slots=True)
class _Cached:
    verified_at: float
    key: ApiKey | None


class KeyVerifier:
    """Turns a presented key into its stored `ApiKey`, or None when it is not one.

    While the store does not answer (its `guard` raises `Unavailable`), the last verification
    of a key stands for up to `stale_s`; a key never verified, or verified longer ago, gets
    the `Unavailable` (a 503), never a guess.
    """

    def __init__(
        self,
        store: AccessStore,
        cache_s: float = DEFAULT_CACHE_S,
        stale_s: float = 0.0,
        guard: Guard | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._cache_s = cache_s
        self._stale_s = max(stale_s, cache_s)
        self._guard = guard
        self._clock = clock
        self._cache: dict[str, _Cached] = {}

    async def verify(self, key: str) -> ApiKey | None:
        """The stored key, or None when `key` is unknown (unknown answers are cached too)."""
        if not key or len(key) > MAX_KEY_LENGTH:
            return None
        return await self.verify_hash(hash_key(key))

    async def verify_hash(self, key_hash: str) -> ApiKey | None:
        """As `verify`, for a key known by its hash (a console session holds only the hash)."""
        now = self._clock()
        cached = self._cache.get(key_hash)
        if cached is not None and cached.verified_at + self._cache_s > now:
            return cached.key
        try:
            stored = await self._lookup(key_hash)
        except Unavailable:
            if cached is not None and cached.verified_at + self._stale_s > now:
                return cached.key
            raise
        self._remember(key_hash, _Cached(now, stored))
        return stored

    async def _lookup(self, key_hash: str) -> ApiKey | None:
        if self._guard is None:
            return await self._store.get_key(key_hash)
        return await self._guard.call(lambda: self._store.get_key(key_hash))

    def _remember(self, key_hash: str, entry: _Cached) -> None:
        self._cache.pop(key_hash, None)
        if len(self._cache) >= CACHE_MAX_ENTRIES:
            # dicts keep insertion order: the first entry is the oldest.
            del self._cache[next(iter(self._cache))]
        self._cache[key_hash] = entry


DEV_KEY_FILE = "dev-api-key"
DEV_KEY_NAME = "development"


@dataclass(frozen=True, slots=True)
class DevKey:
    path: Path
    # Only set when the key was created now: it is shown once, then read from `path`.
    new_key: str | None


async def ensure_dev_key(store: AccessStore, data_dir: Path) -> DevKey:
    """The embedded mode's development key (all scopes), created once into `data_dir`.

    The file is written with mode 0600 before the hash is stored, so a key the store accepts
    can always be read back by its owner. A file whose key the store lost (a deleted database)
    is stored again rather than replaced, so scripts reading the file keep working.
    """
    path = data_dir / DEV_KEY_FILE
    if path.exists():
        key = path.read_text().strip()
        key_hash = hash_key(key)
        if await store.get_key(key_hash) is None:
            await store.put_key(ApiKey(DEV_KEY_NAME, key_hash, frozenset(Scope), _now()))
        return DevKey(path, None)
    key, record = new_api_key(DEV_KEY_NAME, frozenset(Scope))
    # O_EXCL: never overwrite a key another process wrote meanwhile; 0600 from the first byte.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(key + "\n")
    await store.put_key(record)
    return DevKey(path, key)


def _now() -> datetime:
    return to_millis(datetime.now(UTC))
