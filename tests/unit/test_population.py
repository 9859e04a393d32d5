"""Population aggregates (service/core/population, workers/population.py) in the embedded
store: equal to a recomputation from the stored records, merged by days, counted once however
often a batch is redelivered, drift flags what changed and only that, and versions apart."""

import random
from bisect import bisect_right
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from service.adapters.sqlite_population import SqlitePopulationStore
from service.adapters.sqlite_store import SqliteStore
from service.core.explain import explain_batch
from service.core.population import report
from service.core.population.aggregates import Aggregate, Edges, merge_all
from service.core.population.drift import DriftRule
from service.core.population.gauges import PopulationGauges
from service.core.population.reference import Reference
from service.core.records import DecisionEvent, DecisionRecord, ModelRef
from service.core.registry import LoadedModel
from service.core.schema import ModelSchema
from service.metrics import create_metrics
from service.tools.demo import holdout_split, read_german_credit
from service.tools.reference import read_rows
from tests.api_client import GERMAN_CREDIT, MODELS, german_rows
from workers.explainer import choose_engine
from workers.population import Placed, PopulationKeeper

DAYS = 7
FIRST_DAY = date(2026, 11, 20)


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return LoadedModel.from_directory(MODELS / "german-credit")


@pytest.fixture(scope="module")
def reference(model: LoadedModel) -> Reference:
    assert model.reference is not None
    return Reference.from_bytes(model.reference)


def explained(
    model: LoadedModel,
    rows: list[dict[str, object]],
    prefix: str,
    days: int = DAYS,
    first_day: date = FIRST_DAY,
) -> list[DecisionRecord]:
    """Decisions of `rows`, spread over `days` days from `first_day` (at midnight UTC), explained
    as a worker does."""
    start = datetime(first_day.year, first_day.month, first_day.day, tzinfo=UTC)
    events = [
        DecisionEvent(
            transaction_id=f"{prefix}-{i}",
            model=ModelRef(name=model.name, version=model.version),
            features=dict(row),  # type: ignore[arg-type]
            prediction=model.predict(row),
            decided_at=start + timedelta(days=i % days, seconds=i),
        )
        for i, row in enumerate(rows)
    ]
    engine, _ = choose_engine(model, "auto")
    result = explain_batch(model, engine, events, start + timedelta(days=days))
    assert not result.failures
    return result.records


def placed(records: list[DecisionRecord], sources: int = 2) -> list[Placed]:
    """Records as read from `sources` partitions, offsets growing in each."""
    offsets = [0] * sources
    out = []
    for i, record in enumerate(records):
        source = i % sources
        out.append(Placed(record, f"topic/{source}", offsets[source]))
        offsets[source] += 1
    return out


@pytest.fixture
async def population(tmp_path: Path) -> AsyncIterator[SqlitePopulationStore]:
    store = await SqliteStore.open(tmp_path / "store.sqlite3", timedelta(days=7 * 365 + 2))
    try:
        await store.migrate()
        opened = SqlitePopulationStore(store)
        await opened.migrate()
        yield opened
    finally:
        await store.close()


@pytest.fixture
async def referenced(
    population: SqlitePopulationStore, model: LoadedModel, reference: Reference
) -> SqlitePopulationStore:
    """The store once the gateway registered the demo's version and its reference."""
    await population.put_reference(model.version, reference.to_bytes())
    return population


async def keep(
    population: SqlitePopulationStore, model: LoadedModel, items: list[Placed], batch: int = 25
) -> int:
    keeper = PopulationKeeper(population)
    counted = 0
    for at in range(0, len(items), batch):
        counted += await keeper.add(items[at : at + batch], {model.version: model})
    return counted


def assert_same(got: Aggregate, expected: Aggregate) -> None:
    assert got.edges == expected.edges
    assert got.count == expected.count
    for name in ("sum", "abs_sum", "sq_sum"):
        assert np.abs(getattr(got, name) - getattr(expected, name)).max() <= 1e-9, name
    for name in ("hist", "inputs", "shares"):
        assert np.array_equal(getattr(got, name), getattr(expected, name)), name
    assert got.outcomes == expected.outcomes
    assert got.denials == expected.denials
    assert got.reasons == expected.reasons


def naive(records: list[DecisionRecord], schema: ModelSchema, edges: Edges) -> Aggregate:
    """The aggregate counted record by record, value by value, without the vectorized code."""
    expected = Aggregate.empty(schema, edges)
    for record in records:
        expected.count += 1
        for o, row in enumerate(record.attributions):
            for f, attribution in enumerate(row):
                phi = float(np.float32(attribution))
                expected.sum[o, f] += phi
                expected.abs_sum[o, f] += abs(phi)
                expected.sq_sum[o, f] += phi * phi
                expected.hist[o, f, bisect_right(list(edges.attributions[o][f]), phi)] += 1
        for f, feature in enumerate(schema.features):
            value = record.features.get(feature.name)
            numeric = edges.inputs[f]
            missing = expected.inputs.shape[1] - 1
            if value is None:
                cell = missing
            elif numeric is not None:
                cell = bisect_right(list(numeric), float(value))
            else:
                cell = feature.categories.index(str(value))
            expected.inputs[f, cell] += 1
        outcome = record.prediction.decision  # type: ignore[union-attr]
        expected.outcomes[outcome] = expected.outcomes.get(outcome, 0) + 1
        if outcome == "deny":
            expected.denials += 1
            for family in {r.family for r in record.reasons}:
                expected.reasons[family] = expected.reasons.get(family, 0) + 1
        if record.protected_share is not None:
            expected.shares[min(int(record.protected_share * 10), 9)] += 1
    expected.outcomes = dict(sorted(expected.outcomes.items()))
    expected.reasons = dict(sorted(expected.reasons.items()))
    return expected


def days_of(records: list[DecisionRecord]) -> dict[date, list[DecisionRecord]]:
    by_day: dict[date, list[DecisionRecord]] = {}
    for record in records:
        by_day.setdefault(record.decided_at.astimezone(UTC).date(), []).append(record)
    return by_day


async def test_rollups_equal_a_recomputation_and_a_window_the_merge_of_its_days(
    referenced: SqlitePopulationStore, model: LoadedModel, reference: Reference
) -> None:
    records = explained(model, german_rows(140), "rollup")
    assert await keep(referenced, model, placed(records)) == len(records)
    window = report.days_between(FIRST_DAY, FIRST_DAY + timedelta(days=DAYS - 1))
    daily = await report.daily(referenced, model.version, window)
    assert sorted(daily) == window
    for day, day_records in days_of(records).items():
        assert_same(daily[day], naive(day_records, model.schema, reference.edges))
        assert_same(daily[day], Aggregate.of_records(day_records, model.schema, reference.edges))
    merged = merge_all(daily.values())
    assert merged is not None
    assert_same(merged, Aggregate.of_records(records, model.schema, reference.edges))


async def test_replaying_the_same_offsets_changes_nothing(
    referenced: SqlitePopulationStore, model: LoadedModel, reference: Reference
) -> None:
    records = explained(model, german_rows(80), "replay", days=1)
    items = placed(records)
    first, rest = items[:30], items[30:]
    await keep(referenced, model, first)
    day = [FIRST_DAY]
    stored = await referenced.parts(model.version, day)
    # A new worker (nothing in memory) is handed the first batch again, then the rest.
    assert await keep(referenced, model, first) == 0
    assert await referenced.parts(model.version, day) == stored
    assert await keep(referenced, model, first + rest, batch=40) == len(rest)
    (total,) = (await report.daily(referenced, model.version, day)).values()
    assert_same(total, Aggregate.of_records(records, model.schema, reference.edges))


def resampled(model: LoadedModel, count: int, seed: int) -> list[dict[str, object]]:
    """Applicants drawn (with replacement) from the demo's reference hold-out: the reference
    distribution itself."""
    rows = read_rows(GERMAN_CREDIT, model.schema)
    # The hold-out the demo's reference explains (service/tools/demo.py).
    _, y = read_german_credit(GERMAN_CREDIT)
    _, holdout = holdout_split(y)
    pool = [rows[i] for i in sorted(holdout)]
    rng = random.Random(seed)
    return [rng.choice(pool) for _ in range(count)]


async def test_a_null_replay_flags_nothing_and_a_doubled_feature_flags_only_itself(
    referenced: SqlitePopulationStore, model: LoadedModel, reference: Reference
) -> None:
    records = explained(model, resampled(model, 1_200, seed=11), "null", days=1)
    await keep(referenced, model, placed(records))
    (today,) = (await report.daily(referenced, model.version, [FIRST_DAY])).values()
    null = report.drift(today, reference, model.schema, DriftRule())
    assert null.decisions == 1_200
    assert null.drifting == []
    assert null.outputs[0].ndcg > 0.99

    doubled = model.schema.feature_names.index("duration_in_month")
    changed = [
        r.model_copy(
            update={
                "transaction_id": f"doubled-{r.transaction_id}",
                "attributions": [
                    [2 * v if i == doubled else v for i, v in enumerate(r.attributions[0])]
                ],
            }
        )
        for r in records
    ]
    shifted = Aggregate.of_records(changed, model.schema, reference.edges)
    drift = report.drift(shifted, reference, model.schema, DriftRule())
    assert drift.drifting == ["duration_in_month"]
    # The inputs did not move: a logic shift, not a data shift.
    assert max(i.psi for i in drift.inputs) < 0.2


async def test_a_new_version_has_its_own_bins_and_reference(
    population: SqlitePopulationStore, model: LoadedModel, reference: Reference, tmp_path: Path
) -> None:
    other_dir = tmp_path / "german-credit"
    other_dir.mkdir()
    schema = model.schema.model_copy(update={"description": "retrained"})
    (other_dir / "schema.json").write_text(schema.model_dump_json())
    (other_dir / schema.model_file).write_bytes(model.model_bytes)
    other = LoadedModel.from_directory(other_dir)
    assert other.version != model.version
    assert other.reference is None

    await population.put_reference(model.version, reference.to_bytes())
    ours = explained(model, german_rows(20), "ours", days=1)
    theirs = explained(other, german_rows(30), "theirs", days=1)
    keeper = PopulationKeeper(population)
    await keeper.add(placed(ours), {model.version: model})
    await keeper.add(placed(theirs, sources=1), {other.version: other})

    (mine,) = (await report.daily(population, model.version, [FIRST_DAY])).values()
    (new,) = (await report.daily(population, other.version, [FIRST_DAY])).values()
    assert (mine.count, new.count) == (20, 30)
    assert mine.edges == reference.edges.fingerprint
    # No reference of its own: the default grid, never the other version's bins.
    assert new.edges == Edges.default(other.schema).fingerprint != mine.edges
    assert await report.reference_of(population, other.version) is None
    with pytest.raises(ValueError, match="other edges"):
        report.drift(new, reference, other.schema, DriftRule())


async def test_a_reference_is_set_once(
    population: SqlitePopulationStore, model: LoadedModel, reference: Reference
) -> None:
    assert await population.put_reference(model.version, reference.to_bytes())
    assert not await population.put_reference(model.version, b"another")
    assert await population.get_reference(model.version) == reference.to_bytes()


async def test_the_gauges_show_todays_drift_and_counts(
    referenced: SqlitePopulationStore, model: LoadedModel, reference: Reference
) -> None:
    today = datetime.now(UTC).date()
    records = explained(model, resampled(model, 600, seed=5), "gauges", days=1, first_day=today)
    await keep(referenced, model, placed(records))
    metrics = create_metrics()
    await PopulationGauges(referenced, [model], metrics.population).refresh()

    (aggregate,) = (await report.daily(referenced, model.version, [today])).values()
    figures = report.drift(aggregate, reference, model.schema, DriftRule())
    labels = {"model": model.name, "version": model.version[:12]}

    def gauge(name: str, **extra: str) -> float | None:
        return metrics.registry.get_sample_value(name, {**labels, **extra})

    for outcome in ("approve", "deny"):
        assert gauge("shapstream_population_decisions", outcome=outcome) == (
            aggregate.outcomes.get(outcome, 0)
        )
    for family, count in aggregate.reasons.items():
        assert gauge("shapstream_population_reasons", family=family) == count
    assert gauge("shapstream_importance_ndcg") == pytest.approx(figures.outputs[0].ndcg)
    for drift in figures.outputs[0].features:
        assert gauge("shapstream_attribution_drift_psi", feature=drift.feature) == (
            pytest.approx(drift.psi)
        )
        assert gauge("shapstream_attribution_drifting", feature=drift.feature) == 0
    refreshed = metrics.registry.get_sample_value(
        "shapstream_population_refreshed_timestamp_seconds"
    )
    assert refreshed is not None
    assert refreshed > 0
