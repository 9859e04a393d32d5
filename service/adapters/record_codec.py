"""A decision record as column values and back: one encoding for the Cassandra and SQLite stores.

- `attributions`: little-endian float32, row-major (outputs x features). XGBoost computes
  `pred_contribs` in float32, so values coming from it survive exactly; a float64 engine's
  values are rounded to the nearest float32 (relative error below 6e-8).
- `base_value`: little-endian float64; a few bytes, and the additivity check leans on it.
- `inputs` and `prediction`: orjson, the same JSON the event carries.
- `reasons`: orjson, a list of {family, reason, contribution, features} in rank order.
- `protected_share` (a double, or null) and `record_hash` (hex text) as they are.
- `model_format` and `framework_version`: text, null in rows written before they were kept.
- Timestamps: whole milliseconds since the epoch, UTC, because that is what a Cassandra
  `timestamp` holds; sub-millisecond digits are dropped on write so a round trip is equal.
"""

from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import UTC, date, datetime, timedelta
from functools import cache
from typing import Any

import numpy as np
import orjson
from pydantic import TypeAdapter

from service.core.records import (
    BinaryPrediction,
    Claim,
    DecisionRecord,
    DecisionSummary,
    ModelRef,
    MulticlassPrediction,
    Prediction,
    RegressionPrediction,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)
_F32 = np.dtype("<f4")
_F64 = np.dtype("<f8")


def to_epoch_ms(moment: datetime) -> int:
    """Whole milliseconds since the epoch; a naive datetime is refused, not guessed to be UTC."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"timestamp {moment.isoformat()} has no time zone")
    return (moment - _EPOCH) // _ONE_MS


def from_epoch_ms(ms: int) -> datetime:
    return _EPOCH + ms * _ONE_MS


def utc_day(ms: int) -> date:
    return from_epoch_ms(ms).date()


def day_start(day: date) -> datetime:
    """The first instant of a UTC day."""
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def utc_days(start_ms: int, end_ms: int) -> list[date]:
    """The UTC days that [start_ms, end_ms) touches, in order."""
    if end_ms <= start_ms:
        return []
    first, last = utc_day(start_ms), utc_day(end_ms - 1)
    return [first + timedelta(days=n) for n in range((last - first).days + 1)]


def encode_attributions(rows: list[list[float]], outputs: int) -> bytes:
    """Pack (outputs x features) as float32; refuse ragged rows or a row count != outputs."""
    if len(rows) != outputs or len({len(row) for row in rows}) > 1:
        shape = [len(row) for row in rows]
        raise ValueError(f"attributions must be {outputs} rows of equal length, got {shape}")
    return np.asarray(rows, dtype=_F32).tobytes()


def decode_attributions(blob: bytes, outputs: int) -> list[list[float]]:
    matrix = np.frombuffer(blob, dtype=_F32).reshape(outputs, -1)
    rows: list[list[float]] = matrix.astype(np.float64).tolist()
    return rows


def encode_floats(values: list[float]) -> bytes:
    return np.asarray(values, dtype=_F64).tobytes()


def decode_floats(blob: bytes) -> list[float]:
    values: list[float] = np.frombuffer(blob, dtype=_F64).tolist()
    return values


def decision_text(
    prediction: BinaryPrediction | RegressionPrediction | MulticlassPrediction,
) -> str | None:
    """The outcome in its own column so an export needs no JSON; a regression has none."""
    if isinstance(prediction, BinaryPrediction):
        return prediction.decision
    if isinstance(prediction, MulticlassPrediction):
        return prediction.label
    return None


@dataclass(frozen=True, slots=True)
class RecordColumns:
    """The stored form of one `DecisionRecord`, the same in every store."""

    txn_id: str
    model_name: str
    model_version: str
    inputs: bytes
    prediction: bytes
    decision: str | None
    base_value: bytes
    attributions: bytes
    additivity_error: float
    engine: str
    model_format: str | None
    framework_version: str | None
    decided_at_ms: int
    explained_at_ms: int
    reasons: bytes
    protected_share: float | None
    record_hash: str

    def row(self) -> tuple[Any, ...]:
        """The values in field order, which is the column order of the by-transaction tables."""
        return tuple(getattr(self, f.name) for f in fields(self))


def claims_by_record(
    records: Sequence[DecisionRecord], claims: Sequence[Claim]
) -> dict[str, Claim]:
    """The claims by transaction id; each must come with its record (the store keeps a
    decision's claim with it, never one without the other)."""
    by_txn = {claim.transaction_id: claim for claim in claims}
    orphans = by_txn.keys() - {record.transaction_id for record in records}
    if orphans:
        raise ValueError(f"claims without their record: {sorted(orphans)[:3]}")
    return by_txn


def to_columns(record: DecisionRecord) -> RecordColumns:
    return RecordColumns(
        txn_id=record.transaction_id,
        model_name=record.model.name,
        model_version=record.model.version,
        inputs=orjson.dumps(record.features),
        prediction=orjson.dumps(record.prediction.model_dump(mode="json", by_alias=True)),
        decision=decision_text(record.prediction),
        base_value=encode_floats(record.base_value),
        attributions=encode_attributions(record.attributions, outputs=len(record.base_value)),
        additivity_error=record.additivity_error,
        engine=record.engine,
        model_format=record.model_format,
        framework_version=record.framework_version,
        decided_at_ms=to_epoch_ms(record.decided_at),
        explained_at_ms=to_epoch_ms(record.explained_at),
        reasons=orjson.dumps([reason.model_dump(mode="json") for reason in record.reasons]),
        protected_share=record.protected_share,
        record_hash=record.record_hash,
    )


def from_columns(columns: RecordColumns) -> DecisionRecord:
    base_value = decode_floats(columns.base_value)
    return DecisionRecord.model_validate(
        {
            "transaction_id": columns.txn_id,
            "model": {"name": columns.model_name, "version": columns.model_version},
            "features": orjson.loads(columns.inputs),
            "prediction": orjson.loads(columns.prediction),
            "base_value": base_value,
            "attributions": decode_attributions(columns.attributions, outputs=len(base_value)),
            "additivity_error": columns.additivity_error,
            "engine": columns.engine,
            "model_format": columns.model_format,
            "framework_version": columns.framework_version,
            "decided_at": from_epoch_ms(columns.decided_at_ms),
            "explained_at": from_epoch_ms(columns.explained_at_ms),
            "reasons": orjson.loads(columns.reasons),
            "protected_share": columns.protected_share,
            "record_hash": columns.record_hash,
        }
    )


@cache
def _prediction_adapter() -> TypeAdapter[Prediction]:
    # Built on first use, not at import.
    return TypeAdapter(Prediction)


def decision_summary(
    txn_id: str, model_name: str, model_version: str, decided_at_ms: int, prediction: bytes
) -> DecisionSummary:
    """A list line from a decision row's stored columns."""
    return DecisionSummary(
        transaction_id=txn_id,
        model=ModelRef(name=model_name, version=model_version),
        decided_at=from_epoch_ms(decided_at_ms),
        prediction=_prediction_adapter().validate_json(prediction),
    )
