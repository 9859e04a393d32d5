"""API keys, their scopes, and the access log entries: pure values, no I/O."""

import hashlib
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

# Recognisable in a leaked config file or a secret scanner; never part of what is checked.
KEY_PREFIX = "ssk_"
# 32 random bytes: 256 bits of entropy, URL-safe base64 (43 characters).
KEY_BYTES = 32
# The longest string worth hashing: longer "keys" are rejected before any work is done.
MAX_KEY_LENGTH = 128
# Key names appear in logs and the access log: no spaces or control characters to forge lines.
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,63}")


class Scope(StrEnum):
    PREDICT = "predict"
    EXPLANATIONS_READ = "explanations:read"
    AUDIT_EXPORT = "audit:export"


class Action(StrEnum):
    """What an access log entry records: a disclosure, or an attempt that was refused."""

    EXPLANATION_READ = "explanation.read"
    # A page of the console's list of decisions (their ids, outcomes and scores); target
    # "MODEL/DAY".
    DECISION_LIST = "decision.list"
    AUDIT_EXPORT = "audit.export"
    # Refused (an examiner asks who tried, not only who read): 401, 403, and a 404 on an
    # explanation (a probe for transaction ids). See service/core/denials.py.
    DENIED_UNAUTHENTICATED = "denied.unauthenticated"
    DENIED_FORBIDDEN = "denied.forbidden"
    DENIED_NOT_FOUND = "denied.not_found"


# The key name of an entry whose caller had no valid key; never a valid key name (KEY_NAME).
NO_VALID_KEY = "(no valid key)"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A stored key: its hash only, never the key itself."""

    name: str
    key_hash: str
    scopes: frozenset[Scope]
    created_at: datetime


@dataclass(frozen=True, slots=True)
class AccessEntry:
    """One recorded read or refused attempt: who (key name), what (action, target), when (UTC)."""

    at: datetime
    key_name: str
    action: Action
    target: str


def parse_scopes(text: str | Iterable[str]) -> frozenset[Scope]:
    """`"predict,audit:export"` (or an iterable of names) as scopes; raise on unknown names."""
    names = text.split(",") if isinstance(text, str) else text
    scopes: set[Scope] = set()
    for name in (n.strip() for n in names):
        if not name:
            continue
        try:
            scopes.add(Scope(name))
        except ValueError:
            allowed = ", ".join(s.value for s in Scope)
            raise ValueError(f"unknown scope {name!r}; allowed: {allowed}") from None
    if not scopes:
        raise ValueError("at least one scope is required")
    return frozenset(scopes)


def generate_key() -> str:
    """A new random key, shown once to its owner and then only stored as its hash."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def hash_key(key: str) -> str:
    """SHA-256 hex of the key.

    A plain fast hash is right here, unlike for passwords: a key carries 256 random bits, so
    no dictionary or brute force can invert it, and a slow KDF (bcrypt, scrypt) would only
    cost milliseconds on every request. Unsalted, so a key is found by its hash in one read.
    """
    return hashlib.sha256(key.encode()).hexdigest()


def new_api_key(
    name: str, scopes: frozenset[Scope], now: datetime | None = None
) -> tuple[str, ApiKey]:
    """A fresh key and its storable record; the caller shows the key once."""
    if not KEY_NAME.fullmatch(name):
        raise ValueError(
            f"invalid key name {name!r}: 1-64 letters, digits and . _ @ : - (starting with a "
            "letter or digit)"
        )
    key = generate_key()
    return key, ApiKey(name, hash_key(key), scopes, to_millis(now or datetime.now(UTC)))


def to_millis(moment: datetime) -> datetime:
    """`moment` at the millisecond precision both stores keep."""
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)
