"""Real German credit decisions for the population benchmarks: events as the gateway publishes
them, and records as the worker writes them (the demo model, its engine, its reference)."""

from datetime import UTC, datetime
from typing import cast

from bench.e2e import feature_rows
from bench.procs import ROOT
from service.core.decisions import request_hash
from service.core.explain import explain_batch
from service.core.population.aggregates import Edges
from service.core.population.reference import Reference
from service.core.records import DecisionEvent, DecisionRecord, Features, ModelRef
from service.core.registry import LoadedModel
from workers.explainer import choose_engine

MODEL_DIR = ROOT / "models" / "german-credit"


def demo_model() -> LoadedModel:
    """The demo model, with the reference shipped beside it."""
    model = LoadedModel.from_directory(MODEL_DIR)
    if model.reference is None:
        raise SystemExit(f"{MODEL_DIR} has no reference.bin: run `make setup` (the demo model)")
    return model


def reference_edges(model: LoadedModel) -> Edges:
    """The edges the worker bins this version's aggregates on (its reference exists first)."""
    assert model.reference is not None
    return Reference.from_bytes(model.reference).edges


def decision_events(
    model: LoadedModel, count: int, prefix: str, decided_at: datetime | None = None
) -> list[DecisionEvent]:
    """`count` decisions of the German credit rows (cycled), scored as the gateway scores them
    (service/core/decisions.py), each with the caller's id `prefix` + n."""
    rows = feature_rows()
    predictions = [model.prediction(m) for m in model.predict_margins(model.encode_many(rows))]
    hashes = [request_hash(row, None) for row in rows]
    ref = ModelRef(name=model.name, version=model.version)
    moment = decided_at or datetime.now(UTC)
    return [
        DecisionEvent(
            transaction_id=f"{prefix}{n}",
            model=ref,
            features=cast(Features, dict(rows[n % len(rows)])),
            prediction=predictions[n % len(rows)],
            decided_at=moment,
            request_hash=hashes[n % len(rows)],
        )
        for n in range(count)
    ]


def explained(model: LoadedModel, events: list[DecisionEvent]) -> list[DecisionRecord]:
    """The records a worker writes for `events` (the engine it chooses, one batch)."""
    engine, _ = choose_engine(model, "auto")
    result = explain_batch(model, engine, events, datetime.now(UTC))
    if result.failures:
        raise SystemExit(f"{len(result.failures)} events failed: {result.failures[0].detail}")
    return result.records
