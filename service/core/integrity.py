"""The integrity hash of a decision record: SHA-256 over its canonical form and the model hash.

The canonical form of a record is `orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)` (compact,
UTF-8, keys sorted at every level) of this object:

    {
      "transaction_id": str,
      "model": {"name": str, "version": str},
      "features": {name: int | float | str | null},  # as the client sent them
      "prediction": the prediction's JSON as the API shows it (aliases: "class", "margins"),
      "base_value": [float, ...],                   # float64, one per output
      "attributions": [[float, ...], ...],          # each value rounded to float32 first
      "additivity_error": float,
      "engine": str,
      "model_format": str,                          # left out when None (see below)
      "framework_version": str,                     # left out when None
      "decided_at": "YYYY-MM-DDTHH:MM:SS.mmmZ",     # UTC, floored to the millisecond
      "explained_at": "YYYY-MM-DDTHH:MM:SS.mmmZ",
      "reasons": [{"family": str, "reason": str, "contribution": float,
                   "features": [str, ...]}, ...],  # in rank order
      "protected_share": float | null
    }

`model_format` and `framework_version` were added later: a record stored before has neither
(None), and its canonical form is exactly what its hash was computed over then.

Floats are written by orjson in their shortest round-tripping form. Attributions and
timestamps are taken at the precision the stores keep (float32, whole milliseconds), so a
record read back from Cassandra or SQLite, or rebuilt from an export, hashes as written.

    record_hash = sha256(model_version.encode() + b"\\n" + canonical_form).hexdigest()

`model_version` is the model hash (`service.core.registry.model_version`), so the record
hash also binds the record to the exact model that made the decision.
"""

import hashlib
import hmac
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
from numpy.typing import ArrayLike

from service.core.records import DecisionRecord


def canonical_time(moment: datetime) -> str:
    """UTC ISO 8601 with exactly three decimals and a 'Z'; a naive datetime is refused."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"timestamp {moment.isoformat()} has no time zone")
    # isoformat truncates to the millisecond (never rounds up), and is C: strftime cost the
    # worker ~5 us per record.
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").removesuffix("+00:00") + "Z"


def stored_attributions(rows: ArrayLike) -> list[list[float]]:
    """Attributions rounded to the float32 values the stores keep, as Python floats."""
    rounded: list[list[float]] = np.asarray(rows, dtype=np.float32).astype(np.float64).tolist()
    return rounded


def canonical_record(record: DecisionRecord) -> bytes:
    """Every content field of `record` except `record_hash`, in the canonical form above."""
    content: dict[str, Any] = {
        "transaction_id": record.transaction_id,
        "model": {"name": record.model.name, "version": record.model.version},
        "features": record.features,
        "prediction": record.prediction.model_dump(mode="json", by_alias=True),
        "base_value": record.base_value,
        "attributions": stored_attributions(record.attributions),
        "additivity_error": record.additivity_error,
        "engine": record.engine,
        "decided_at": canonical_time(record.decided_at),
        "explained_at": canonical_time(record.explained_at),
        "reasons": [reason.model_dump(mode="json") for reason in record.reasons],
        "protected_share": record.protected_share,
    }
    # Present only when recorded: records stored before these fields still hash as written.
    if record.model_format is not None:
        content["model_format"] = record.model_format
    if record.framework_version is not None:
        content["framework_version"] = record.framework_version
    return orjson.dumps(content, option=orjson.OPT_SORT_KEYS)


def record_hash(record: DecisionRecord) -> str:
    """SHA-256 hex of the model hash, a newline, and the record's canonical form."""
    digest = hashlib.sha256(record.model.version.encode())
    digest.update(b"\n")
    digest.update(canonical_record(record))
    return digest.hexdigest()


def sealed(record: DecisionRecord) -> DecisionRecord:
    """`record` with its `record_hash` set from its content."""
    # A shallow copy: every other field is shared, none is re-validated.
    return record.model_copy(update={"record_hash": record_hash(record)})


def verify_record(record: DecisionRecord) -> bool:
    """Whether `record_hash` matches the record's content."""
    # Bytes: compare_digest refuses non-ASCII text, and a tampered hash may hold any.
    return hmac.compare_digest(record.record_hash.encode(), record_hash(record).encode())
