"""One behaviour for every `ExplanationStore`: the SQLite and the Cassandra tests both run these.

A test module subclasses `StoreContract` (its name starting with `Test`) and provides a
`store_factory` fixture: an async function opening a migrated store with a given retention.
"""

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from datetime import UTC, datetime, timedelta

import numpy as np
import orjson
import pytest

from service.core.integrity import sealed, verify_record
from service.core.ports import ExplanationStore, ModelConflictError
from service.core.records import (
    BinaryPrediction,
    Claim,
    DecisionCursor,
    DecisionRecord,
    Features,
    ModelArtifact,
    ModelRef,
    MulticlassPrediction,
    Reason,
    RegressionPrediction,
)
from service.core.schema import DecisionRule, Feature, FeatureType, ModelSchema, Task

StoreFactory = Callable[[timedelta], Awaitable[ExplanationStore]]

RETENTION = timedelta(days=7 * 365 + 2)
SHORT_RETENTION = timedelta(seconds=3)
EXPIRY_DEADLINE_S = 30.0
POLL_INTERVAL_S = 0.1
LARGE_BATCH = 2_000

# Two applicants of the Statlog German Credit data (UCI id 144, Hans Hofmann, CC BY 4.0).
APPLICANTS: tuple[Features, ...] = (
    {
        "status_of_existing_checking_account": "... < 0 DM",
        "duration_in_month": 6.0,
        "credit_history": "critical account/ other credits existing (not at this bank)",
        "purpose": "radio/television",
        "credit_amount": 1169.0,
        "savings_account_and_bonds": "unknown/ no savings account",
        "present_employment_since": "... >= 7 years",
        "installment_rate_in_percentage_of_disposable_income": 4.0,
        "personal_status_and_sex": "male : divorced/separated",
        "other_debtors_or_guarantors": "none",
        "present_residence_since": 4.0,
        "property": "real estate",
        "age_in_years": 67.0,
        "other_installment_plans": "none",
        "housing": "own",
        "number_of_existing_credits_at_this_bank": 2.0,
        "job": "skilled employee / official",
        "number_of_people_being_liable_to_provide_maintenance_for": 1.0,
        "telephone": "yes, registered under the customers name",
        "foreign_worker": "yes",
    },
    {
        "status_of_existing_checking_account": "0 <= ... < 200 DM",
        "duration_in_month": 48.0,
        "credit_history": "existing credits paid back duly till now",
        "purpose": "radio/television",
        "credit_amount": 5951.0,
        "savings_account_and_bonds": "... < 100 DM",
        "present_employment_since": "1 <= ... < 4 years",
        "installment_rate_in_percentage_of_disposable_income": 2.0,
        "personal_status_and_sex": "male : divorced/separated",
        "other_debtors_or_guarantors": "none",
        "present_residence_since": 2.0,
        # A missing value, as a client may send it.
        "property": None,
        "age_in_years": 22.0,
        "other_installment_plans": "none",
        "housing": "own",
        "number_of_existing_credits_at_this_bank": 1.0,
        "job": "skilled employee / official",
        "number_of_people_being_liable_to_provide_maintenance_for": 1.0,
        "telephone": "none",
        "foreign_worker": "yes",
    },
)
FEATURES = tuple(APPLICANTS[0])
CLASSES = ("low", "medium", "high")


def new_id() -> str:
    return f"txn-{uuid.uuid4()}"


def to_ms(moment: datetime) -> datetime:
    """What a store keeps of a timestamp: whole milliseconds."""
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def stored(record: DecisionRecord) -> DecisionRecord:
    """`record` as a store returns it."""
    return record.model_copy(
        update={"decided_at": to_ms(record.decided_at), "explained_at": to_ms(record.explained_at)}
    )


def attributions(outputs: int, seed: int) -> list[list[float]]:
    """Values as `pred_contribs` gives them: float32, here widened to Python floats."""
    values = np.random.default_rng(seed).normal(0.0, 0.4, (outputs, len(FEATURES)))
    rows: list[list[float]] = values.astype(np.float32).astype(np.float64).tolist()
    return rows


# What a denial carries: ranked reasons (summed float32 attributions) and the protected share.
REASONS = [
    Reason(
        family="duration",
        reason="Duration of credit is long",
        contribution=0.6178790330886841,
        features=["duration_in_month"],
    ),
    Reason(
        family="amount",
        reason="Credit amount is high",
        contribution=0.21035364270210266,
        features=["credit_amount", "installment_rate_in_percentage_of_disposable_income"],
    ),
]


def _record(
    prediction: BinaryPrediction | RegressionPrediction | MulticlassPrediction,
    base_value: list[float],
    seed: int,
    transaction_id: str | None,
    decided_at: datetime | None,
    reasons: list[Reason],
    share: float | None,
) -> DecisionRecord:
    decided = decided_at or datetime.now(UTC) - timedelta(seconds=1)
    record = DecisionRecord(
        transaction_id=transaction_id or new_id(),
        model=ModelRef(
            name=f"german-credit-{prediction.task}",
            version="sha256:" + hashlib.sha256(prediction.task.encode()).hexdigest(),
        ),
        features=APPLICANTS[seed % len(APPLICANTS)],
        prediction=prediction,
        base_value=base_value,
        attributions=attributions(len(base_value), seed),
        additivity_error=3.814697265625e-06,
        engine="pred_contribs",
        model_format="xgboost",
        framework_version="3.0.2",
        decided_at=decided,
        explained_at=decided + timedelta(milliseconds=41, microseconds=517),
        reasons=reasons,
        protected_share=share,
        record_hash="",
    )
    return sealed(record)


def binary_record(
    seed: int = 1, transaction_id: str | None = None, decided_at: datetime | None = None
) -> DecisionRecord:
    prediction = BinaryPrediction(probability=0.7310585786300049, margin=1.0, decision="deny")
    base_value = [-0.8472978603872037]
    return _record(prediction, base_value, seed, transaction_id, decided_at, REASONS, 0.0817)


def legacy_record(seed: int = 4, decided_at: datetime | None = None) -> DecisionRecord:
    """A denial as stored before records kept the model's format and framework version."""
    record = binary_record(seed, decided_at=decided_at)
    return sealed(record.model_copy(update={"model_format": None, "framework_version": None}))


def regression_record(seed: int = 2) -> DecisionRecord:
    prediction = RegressionPrediction(value=4211.613, margin=4211.613)
    # A schema marking no protected feature has no share.
    return _record(prediction, [3271.26], seed, None, None, [], None)


def multiclass_record(seed: int = 3) -> DecisionRecord:
    prediction = MulticlassPrediction.model_validate(
        {
            "class": "medium",
            "probabilities": {"low": 0.2119, "medium": 0.5761, "high": 0.2120},
            "margins": {"low": -0.35, "medium": 0.65, "high": -0.3495},
        }
    )
    return _record(prediction, [-0.0986, 0.1132, -0.0146], seed, None, None, [], 0.0)


def claim_for(transaction_id: str, request_hash: str) -> Claim:
    response = {"transaction_id": transaction_id, "prediction": {"decision": "deny"}}
    return Claim(
        transaction_id=transaction_id,
        request_hash=request_hash,
        response=orjson.dumps(response),
    )


def model_artifact(version: str) -> ModelArtifact:
    schema = ModelSchema(
        name="german-credit",
        task=Task.BINARY,
        features=(
            Feature(name="duration_in_month", type=FeatureType.NUMERIC, minimum=1, maximum=72),
            Feature(name="credit_amount", type=FeatureType.NUMERIC, minimum=0),
            Feature(
                name="housing", type=FeatureType.CATEGORICAL, categories=("own", "rent", "for free")
            ),
        ),
        decision=DecisionRule(positive_class="bad", negative_class="good"),
    )
    model_json = orjson.dumps({"learner": {"gradient_booster": {"model": {"trees": []}}}})
    return ModelArtifact(
        name=schema.name,
        version=version,
        schema_bytes=schema.model_dump_json().encode(),
        model_bytes=model_json,
    )


def with_version(record: DecisionRecord, version: str) -> DecisionRecord:
    """`record` as decided by another model version, sealed again."""
    model = record.model.model_copy(update={"version": version})
    return sealed(record.model_copy(update={"model": model}))


async def check_brought_up_to_date(store: ExplanationStore, old: DecisionRecord) -> None:
    """`store` holds `old`, written by a build before records kept the model's format: after
    `migrate` (twice) it reads `old` back as it was and sound, and keeps new records beside it."""
    await store.migrate()
    await store.migrate()
    read = await store.get(old.transaction_id)
    assert read == stored(old)
    assert read is not None
    assert verify_record(read)
    new = binary_record()
    await store.write([new])
    assert await store.get(new.transaction_id) == stored(new)
    start = old.decided_at - timedelta(hours=1)
    scanned = [r async for r in store.scan(old.model.version, start, datetime.now(UTC))]
    assert {r.transaction_id: r for r in scanned} == {
        record.transaction_id: stored(record) for record in (old, new)
    }
    assert all(verify_record(record) for record in scanned)


async def wait_until(condition: Callable[[], Awaitable[bool]], what: str) -> float:
    """Poll `condition` until it holds; the seconds it took."""
    started = time.monotonic()
    while not await condition():
        elapsed = time.monotonic() - started
        assert elapsed < EXPIRY_DEADLINE_S, f"{what} after {EXPIRY_DEADLINE_S} s"
        await asyncio.sleep(POLL_INTERVAL_S)
    return time.monotonic() - started


class StoreContract:
    """Tests every store must pass; subclasses provide a `store_factory` fixture."""

    @pytest.fixture
    async def store(self, store_factory: StoreFactory) -> AsyncIterator[ExplanationStore]:
        opened = await store_factory(RETENTION)
        try:
            yield opened
        finally:
            await opened.close()

    async def test_migrate_twice_is_fine(self, store: ExplanationStore) -> None:
        await store.migrate()
        await store.migrate()
        await store.ping()

    @pytest.mark.parametrize(
        "make",
        [binary_record, regression_record, multiclass_record, legacy_record],
        ids=lambda f: f.__name__,
    )
    async def test_record_round_trip(
        self, store: ExplanationStore, make: Callable[[], DecisionRecord]
    ) -> None:
        record = make()
        await store.write([record])
        read = await store.get(record.transaction_id)
        assert read == stored(record)
        assert read.record_hash == record.record_hash
        assert verify_record(read)

    async def test_recent_lists_a_day_newest_first_a_page_at_a_time(
        self, store: ExplanationStore
    ) -> None:
        version = f"sha256:{uuid.uuid4().hex}"
        noon = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
        day = (noon - timedelta(days=1)).date()
        at = [noon - timedelta(days=1, seconds=s) for s in (0, 5, 5, 9, 30)]
        records = [with_version(binary_record(i, decided_at=t), version) for i, t in enumerate(at)]
        approved = BinaryPrediction(probability=0.1, margin=-2.2, decision="approve")
        records[1] = sealed(records[1].model_copy(update={"prediction": approved}))
        # Another day, and another version, never listed.
        records.append(with_version(binary_record(7, decided_at=noon), version))
        await store.write([*records, binary_record(8, decided_at=at[0])])
        # Newest first; the two decided in one millisecond by transaction id, descending.
        expected = sorted(records[:5], key=lambda r: (r.decided_at, r.transaction_id))[::-1]

        first = await store.recent(version, day, 2)
        rest = await store.recent(
            version, day, 10, DecisionCursor(first[-1].decided_at, first[-1].transaction_id)
        )
        listed = [*first, *rest]
        assert [row.transaction_id for row in listed] == [r.transaction_id for r in expected]
        assert [row.decided_at for row in listed] == [to_ms(r.decided_at) for r in expected]
        assert all(row.model == r.model for row, r in zip(listed, expected, strict=True))
        assert [row.prediction for row in listed] == [r.prediction for r in expected]
        denials = await store.recent(version, day, 10, decision="deny")
        assert [row.transaction_id for row in denials] == [
            r.transaction_id for r in expected if r.transaction_id != records[1].transaction_id
        ]
        assert await store.recent(version, day - timedelta(days=1), 10) == []

    async def test_model_names_name_every_stored_version(self, store: ExplanationStore) -> None:
        version = f"sha256:{uuid.uuid4().hex}"
        await store.put_model(model_artifact(version))
        assert (await store.model_names())[version] == "german-credit"

    async def test_missing_transaction_is_none(self, store: ExplanationStore) -> None:
        assert await store.get(new_id()) is None

    async def test_empty_batch_is_a_no_op(self, store: ExplanationStore) -> None:
        await store.write([])

    async def test_replaying_a_batch_changes_nothing(self, store: ExplanationStore) -> None:
        batch = [binary_record(seed) for seed in range(10)] + [multiclass_record()]
        await store.write(batch)
        first = [await store.get(record.transaction_id) for record in batch]
        await store.write(batch)
        second = [await store.get(record.transaction_id) for record in batch]
        assert first == second == [stored(record) for record in batch]

    @pytest.mark.parametrize(
        "change",
        [
            {"decided_at": datetime(2026, 11, 2, 9, 30)},
            {"base_value": [0.0, 0.0], "attributions": [[0.1, 0.2], [0.3]]},
            {"attributions": [[0.1] * len(FEATURES)] * 2},
        ],
        ids=["naive-timestamp", "ragged-attributions", "rows-not-outputs"],
    )
    async def test_a_bad_record_fails_the_batch_before_any_write(
        self, store: ExplanationStore, change: dict[str, object]
    ) -> None:
        good = binary_record()
        bad = binary_record().model_copy(update=change)
        with pytest.raises(ValueError, match=r"time zone|attributions"):
            await store.write([good, bad])
        assert await store.get(good.transaction_id) is None

    async def test_a_record_too_big_to_share_a_request_is_written_with_the_rest(
        self, store: ExplanationStore
    ) -> None:
        small = [binary_record(seed) for seed in range(3)]
        # ~60 kB of inputs: more than a Cassandra batch may hold, sent on its own.
        big = binary_record(9).model_copy(
            update={"features": {**small[0].features, "note": "x" * 60_000}}
        )
        await store.write([small[0], big, *small[1:]])
        for record in [*small, big]:
            assert await store.get(record.transaction_id) == stored(record)

    async def test_claims_are_found_once_written_with_their_records(
        self, store: ExplanationStore
    ) -> None:
        records = [binary_record(seed) for seed in range(5)]
        ids = [r.transaction_id for r in records]
        claims = [claim_for(txn, f"sha256:{n}") for n, txn in enumerate(ids)]
        assert await store.find_claims(ids) == {}
        await store.write(records[:3], claims[:3])
        await store.write(records[:3], claims[:3])  # idempotent
        await store.write(records[3:])  # records without claims claim nothing
        found = await store.find_claims([*ids, new_id()])
        assert found == {c.transaction_id: c for c in claims[:3]}

    async def test_the_last_claim_of_an_id_wins(self, store: ExplanationStore) -> None:
        record = binary_record()
        await store.write([record], [claim_for(record.transaction_id, "sha256:aaaa")])
        second = claim_for(record.transaction_id, "sha256:bbbb")
        await store.write([record], [second])
        assert await store.find_claims([record.transaction_id]) == {record.transaction_id: second}

    async def test_a_claim_without_its_record_is_refused(self, store: ExplanationStore) -> None:
        with pytest.raises(ValueError, match="without their record"):
            await store.write([binary_record()], [claim_for(new_id(), "sha256:aaaa")])

    async def test_model_round_trip(self, store: ExplanationStore) -> None:
        artifact = model_artifact(f"sha256:{uuid.uuid4().hex}")
        assert await store.get_model(artifact.version) is None
        await store.put_model(artifact)
        await store.put_model(artifact)
        assert await store.get_model(artifact.version) == artifact

    async def test_a_version_cannot_change_content(self, store: ExplanationStore) -> None:
        artifact = model_artifact(f"sha256:{uuid.uuid4().hex}")
        await store.put_model(artifact)
        changed = artifact.model_copy(update={"model_bytes": b'{"learner": {}}'})
        with pytest.raises(ModelConflictError):
            await store.put_model(changed)
        assert await store.get_model(artifact.version) == artifact

    async def test_records_and_claims_expire(self, store_factory: StoreFactory) -> None:
        store = await store_factory(SHORT_RETENTION)
        try:
            record = binary_record(decided_at=datetime.now(UTC))
            first = claim_for(record.transaction_id, "sha256:aaaa")
            await store.write([record], [first])
            assert await store.get(record.transaction_id) == stored(record)
            assert await store.find_claims([record.transaction_id]) == {
                record.transaction_id: first
            }

            async def record_gone() -> bool:
                return await store.get(record.transaction_id) is None

            async def claim_free() -> bool:
                return await store.find_claims([record.transaction_id]) == {}

            await wait_until(record_gone, "the record is still there")
            await wait_until(claim_free, "the claim still holds the id")
        finally:
            await store.close()

    async def test_large_batch(self, store: ExplanationStore) -> None:
        batch = [binary_record(seed) for seed in range(LARGE_BATCH)]
        started = time.perf_counter()
        await store.write(batch)
        elapsed = time.perf_counter() - started
        print(f"{type(store).__name__}: {LARGE_BATCH} records in {elapsed:.3f} s")
        for record in batch[:: LARGE_BATCH // 20]:
            assert await store.get(record.transaction_id) == stored(record)

    async def test_scan_reads_a_time_range_of_one_version(self, store: ExplanationStore) -> None:
        version = f"sha256:{uuid.uuid4().hex}"
        midnight = datetime(2026, 3, 2, tzinfo=UTC)
        start, end = midnight - timedelta(hours=1), midnight + timedelta(days=1)
        one_ms = timedelta(milliseconds=1)
        inside = [start, midnight - one_ms, midnight, end - one_ms] + [
            midnight + timedelta(minutes=37 * n, microseconds=n) for n in range(12)
        ]
        records = [binary_record(n, decided_at=at) for n, at in enumerate(inside)]
        records.append(multiclass_record().model_copy(update={"decided_at": midnight}))
        records.append(legacy_record(decided_at=midnight + timedelta(hours=2)))
        expected = [with_version(record, version) for record in records]
        outside = [
            with_version(binary_record(decided_at=start - one_ms), version),
            with_version(binary_record(decided_at=end), version),
            binary_record(decided_at=midnight),  # another version
        ]
        await store.write(expected + outside)

        found = [record async for record in store.scan(version, start, end)]
        by_id = {record.transaction_id: record for record in found}
        assert len(by_id) == len(found) == len(expected)
        assert by_id == {record.transaction_id: stored(record) for record in expected}
        assert all(verify_record(record) for record in found)
        # Day by day, the same order every time (within a day Cassandra goes bucket by bucket).
        days = [record.decided_at.date() for record in found]
        assert days == sorted(days)
        assert found == [record async for record in store.scan(version, start, end)]
        empty = store.scan(version, end + one_ms, end + timedelta(days=3))
        assert [record async for record in empty] == []

    async def test_a_scan_can_stop_early(self, store: ExplanationStore) -> None:
        version = f"sha256:{uuid.uuid4().hex}"
        decided = datetime(2026, 3, 2, 12, tzinfo=UTC)
        records = [with_version(binary_record(n, decided_at=decided), version) for n in range(5)]
        await store.write(records)
        async with aclosing(store.scan(version, decided, decided + timedelta(days=1))) as scan:
            first = await anext(scan)
        assert await store.get(first.transaction_id) == first

    async def test_model_versions_lists_every_stored_version(self, store: ExplanationStore) -> None:
        versions = [f"sha256:{uuid.uuid4().hex}" for _ in range(3)]
        for version in versions:
            await store.put_model(model_artifact(version))
        listed = await store.model_versions()
        assert set(versions) <= set(listed)
        assert listed == sorted(listed)
