"""A worker keeps the first event of each transaction id and sets later ones aside."""

from datetime import UTC, datetime, timedelta

from service.core.records import BinaryPrediction, DecisionEvent, ModelRef
from workers.first_events import FirstEvents, Identity, Verdict

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def event(txn: str, request_hash: str = "h1", margin: float = -0.4, ms: int = 0) -> DecisionEvent:
    return DecisionEvent(
        transaction_id=txn,
        model=ModelRef(name="demo", version="v1"),
        features={"n": 1},
        prediction=BinaryPrediction(probability=0.4, margin=margin, decision="approve"),
        decided_at=T0 + timedelta(milliseconds=ms),
        request_hash=request_hash,
    )


def test_in_one_batch_the_first_wins_and_a_repeat_decided_later_is_a_copy() -> None:
    firsts = FirstEvents(capacity=10)
    batch: dict[str, Identity] = {}
    assert firsts.verdict(event("a"), batch) is Verdict.FIRST
    assert firsts.verdict(event("b"), batch) is Verdict.FIRST
    # The same request decided again by another gateway a few ms later: the same decision.
    assert firsts.verdict(event("a", ms=3), batch) is Verdict.SAME
    assert firsts.verdict(event("a", request_hash="h2"), batch) is Verdict.CONFLICT
    assert firsts.verdict(event("b", margin=0.9), batch) is Verdict.CONFLICT


def test_stored_ids_are_remembered_across_batches_within_capacity() -> None:
    firsts = FirstEvents(capacity=2)
    firsts.stored([event("a"), event("b"), event("c")])
    assert firsts.verdict(event("a"), {}) is Verdict.FIRST  # forgotten: beyond capacity
    assert firsts.verdict(event("b"), {}) is Verdict.SAME
    assert firsts.verdict(event("c", request_hash="h2"), {}) is Verdict.CONFLICT


def test_judging_does_not_remember_what_was_not_stored() -> None:
    firsts = FirstEvents(capacity=10)
    firsts.verdict(event("a"), {})
    assert firsts.verdict(event("a", request_hash="h2"), {}) is Verdict.FIRST
