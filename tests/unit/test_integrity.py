"""The record hash: stable, sensitive to every field, unchanged by a store round trip."""

import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from service.adapters.sqlite_store import DB_FILE, SqliteStore
from service.core.explain import explain_batch
from service.core.integrity import canonical_record, record_hash, sealed, verify_record
from service.core.records import (
    BinaryPrediction,
    DecisionEvent,
    DecisionRecord,
    ModelRef,
    Reason,
)
from service.core.registry import LoadedModel
from tests.api_client import MODELS, german_rows
from tests.store_contract import RETENTION, binary_record, multiclass_record, regression_record

DECIDED = datetime(2025, 3, 4, 5, 6, 7, 890_123, tzinfo=UTC)


def fixed_record() -> DecisionRecord:
    """A record with every field set, pinned so the canonical form cannot drift unnoticed."""
    return sealed(
        legacy_fixed_record().model_copy(
            update={"model_format": "xgboost", "framework_version": "2.1.4"}
        )
    )


def legacy_fixed_record() -> DecisionRecord:
    """`fixed_record` as stored before records kept the model's format and framework version."""
    return sealed(
        DecisionRecord(
            transaction_id="txn-0001",
            model=ModelRef(name="german-credit", version="ab" * 32),
            features={
                "duration_in_month": 48,
                "credit_amount": 5951.5,
                "housing": "own",
                "x": None,
            },
            prediction=BinaryPrediction(
                probability=0.75, margin=1.0986122886681098, decision="deny"
            ),
            base_value=[-0.8472978603872037],
            attributions=[[0.75, 0.25, -0.125, 0.0]],
            additivity_error=3.814697265625e-06,
            engine="pred_contribs",
            model_format=None,
            framework_version=None,
            decided_at=DECIDED,
            explained_at=DECIDED + timedelta(milliseconds=41),
            reasons=[
                Reason(
                    family="duration",
                    reason="Duration of credit is long",
                    contribution=0.75,
                    features=["duration_in_month"],
                )
            ],
            protected_share=0.0,
            record_hash="",
        )
    )


# The canonical form of `legacy_fixed_record`: the release before model formats hashed this.
LEGACY_CANONICAL = (
    b'{"additivity_error":3.814697265625e-6,"attributions":[[0.75,0.25,-0.125,0.0]],'
    b'"base_value":[-0.8472978603872037],"decided_at":"2025-03-04T05:06:07.890Z",'
    b'"engine":"pred_contribs","explained_at":"2025-03-04T05:06:07.931Z",'
    b'"features":{"credit_amount":5951.5,"duration_in_month":48,"housing":"own","x":null},'
    b'"model":{"name":"german-credit","version":"' + b"ab" * 32 + b'"},'
    b'"prediction":{"decision":"deny","margin":1.0986122886681098,"probability":0.75,'
    b'"task":"binary"},"protected_share":0.0,"reasons":[{"contribution":0.75,'
    b'"family":"duration","features":["duration_in_month"],'
    b'"reason":"Duration of credit is long"}],"transaction_id":"txn-0001"}'
)


def test_the_canonical_form_is_as_documented() -> None:
    record = fixed_record()
    # The legacy form with the two keys in their sorted places.
    assert canonical_record(record) == LEGACY_CANONICAL.replace(
        b'"model":', b'"framework_version":"2.1.4","model":'
    ).replace(b'"prediction":', b'"model_format":"xgboost","prediction":')
    expected = hashlib.sha256(b"ab" * 32 + b"\n" + canonical_record(record)).hexdigest()
    assert record.record_hash == expected
    # Every stored hash depends on this value: changing the canonical form breaks them all.
    assert expected == "df0ec0b96bdb1c9ba0006f278285ac848ebce6ea6e280a21ba121c41debf9693"


def test_a_record_stored_before_the_model_format_hashes_as_it_did() -> None:
    """Without model format and framework version (None), the canonical form and hash are
    those of the release before them: records stored then still verify."""
    record = legacy_fixed_record()
    assert canonical_record(record) == LEGACY_CANONICAL
    expected = hashlib.sha256(b"ab" * 32 + b"\n" + LEGACY_CANONICAL).hexdigest()
    assert record.record_hash == expected
    assert expected == "e49854cf6b5d65c64518945e3472b6e3bcf769f2fc01b6fd9ad994c6298030f9"
    assert verify_record(record)


def test_a_model_format_added_to_or_removed_from_a_record_breaks_its_hash() -> None:
    legacy, record = legacy_fixed_record(), fixed_record()
    assert record.record_hash != legacy.record_hash
    assert not verify_record(legacy.model_copy(update={"model_format": "xgboost"}))
    assert not verify_record(legacy.model_copy(update={"framework_version": "2.1.4"}))
    assert not verify_record(record.model_copy(update={"model_format": None}))
    assert not verify_record(record.model_copy(update={"framework_version": None}))


def test_every_content_field_is_hashed() -> None:
    content = orjson.loads(canonical_record(fixed_record()))
    assert set(content) == set(DecisionRecord.model_fields) - {"record_hash"}


def test_the_hash_is_stable() -> None:
    first, second = fixed_record(), fixed_record()
    assert first.record_hash == second.record_hash == record_hash(first)
    assert len(first.record_hash) == 64
    assert verify_record(first)


CHANGES: dict[str, dict[str, Any]] = {
    "transaction_id": {"transaction_id": "txn-0002"},
    "model-name": {"model": ModelRef(name="german-credit-2", version="ab" * 32)},
    "model-version": {"model": ModelRef(name="german-credit", version="ac" * 32)},
    "features": {"features": {"duration_in_month": 47}},
    "feature-int-vs-float": {
        "features": {
            "duration_in_month": 48.0,
            "credit_amount": 5951.5,
            "housing": "own",
            "x": None,
        }
    },
    "prediction": {
        "prediction": BinaryPrediction(
            probability=0.75, margin=1.0986122886681098, decision="approve"
        )
    },
    "base_value": {"base_value": [-0.8472978603872038]},
    "attributions": {"attributions": [[0.75, 0.25, -0.125, 0.001]]},
    "additivity_error": {"additivity_error": 3.9e-06},
    "engine": {"engine": "fast"},
    "model_format": {"model_format": "lightgbm"},
    "framework_version": {"framework_version": "2.1.3"},
    "no-model-format": {"model_format": None},
    "no-framework-version": {"framework_version": None},
    "decided_at": {"decided_at": DECIDED + timedelta(milliseconds=1)},
    "explained_at": {"explained_at": DECIDED + timedelta(milliseconds=42)},
    "reasons": {"reasons": []},
    "reason-text": {
        "reasons": [
            Reason(
                family="duration",
                reason="Duration of credit is short",
                contribution=0.75,
                features=["duration_in_month"],
            )
        ]
    },
    "protected_share": {"protected_share": 0.001},
    "no-protected-share": {"protected_share": None},
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_any_change_breaks_the_hash(change: dict[str, Any]) -> None:
    original = fixed_record()
    altered = original.model_copy(update=change)
    assert not verify_record(altered)
    assert record_hash(altered) != original.record_hash


def test_a_tampered_hash_fails_verification() -> None:
    record = fixed_record()
    assert not verify_record(record.model_copy(update={"record_hash": "0" * 64}))
    assert not verify_record(record.model_copy(update={"record_hash": "é"}))


def test_the_hash_is_taken_at_the_stored_precision() -> None:
    """What a store drops (sub-millisecond time, float64 attribution digits) is not hashed."""
    record = fixed_record()
    finer = record.model_copy(
        update={
            "decided_at": DECIDED + timedelta(microseconds=999 - 123),
            "attributions": [[0.75 + 1e-12, 0.25, -0.125, 0.0]],
        }
    )
    assert verify_record(finer)
    # The same instant written in another time zone.
    berlin = DECIDED.astimezone(timezone(timedelta(hours=1)))
    elsewhere = record.model_copy(update={"decided_at": berlin})
    assert verify_record(elsewhere)


def test_a_naive_time_is_refused() -> None:
    naive = fixed_record().model_copy(update={"decided_at": datetime(2025, 3, 4, 5, 6, 7)})
    with pytest.raises(ValueError, match="time zone"):
        record_hash(naive)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / DB_FILE, RETENTION)
    await opened.migrate()
    try:
        yield opened
    finally:
        await opened.close()


async def test_explained_records_verify_after_a_sqlite_round_trip(store: SqliteStore) -> None:
    model = LoadedModel.from_directory(MODELS / "german-credit")
    events = [
        DecisionEvent(
            transaction_id=f"txn-{i}",
            model=ModelRef(name=model.name, version=model.version),
            features=row,
            prediction=model.predict(row),
            decided_at=DECIDED,
        )
        for i, row in enumerate(german_rows(50))
    ]
    records = explain_batch(model, model.framework.reference_engine(), events, DECIDED).records
    assert any(record.reasons for record in records)
    records += [binary_record(), regression_record(), multiclass_record()]
    await store.write(records)
    for record in records:
        read = await store.get(record.transaction_id)
        assert read is not None
        assert read.record_hash == record.record_hash
        assert verify_record(read)


async def test_float64_attributions_verify_as_stored(store: SqliteStore) -> None:
    """A float64 engine's values are stored as float32; the hash was taken at that precision."""
    values = np.random.default_rng(7).normal(0.0, 0.4, (1, 4)).tolist()
    record = sealed(fixed_record().model_copy(update={"attributions": values}))
    await store.write([record])
    read = await store.get(record.transaction_id)
    assert read is not None
    assert read.attributions != record.attributions
    assert verify_record(read)
