"""Deciding: validate, score, publish durably, answer; once per caller transaction id.

A caller's transaction id is decided at most once without a consensus round per request
(docs/decision-path.md): this process's memory of recent ids answers repeats and merges
concurrent ones; otherwise one quorum read of the id's claim tells a first request from a
repeat; a first request is published (Kafka, or the spool: durable either way), and the
worker stores its answer as the id's claim with the record. Kafka's order settles the race
the read cannot see: workers keep the first event of an id and skip or dead-letter later ones.
"""

import asyncio
import hashlib
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from service.core.breaker import Guard
from service.core.coalesce import Coalescer
from service.core.engine.base import FloatMatrix
from service.core.idempotency import RecentIds
from service.core.ports import EventBus, ExplanationStore
from service.core.records import Claim, DecisionEvent, ModelRef
from service.core.registry import InvalidFeatures, LoadedModel, ModelRegistry, UnknownModel
from service.errors import Conflict, FieldProblem, InvalidRequest, Overloaded, Unavailable
from service.metrics import Metrics

# Claims read per store request, and store requests in flight at most: a lone request goes at
# once, and under load each carries the ids that arrived while the previous one was out.
CLAIMS_PER_REQUEST = 32
CLAIM_REQUESTS = 8


def request_hash(features: Mapping[str, Any], model: str | None) -> str:
    """Fingerprint of what the client asked, to tell a retry from a conflicting reuse of an id."""
    canonical = orjson.dumps({"features": features, "model": model}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


class Decider:
    """Turns requests into decisions, each published durably and at most once per caller id.

    One per gateway process: it holds the memory of recent ids.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        bus: EventBus,
        store: ExplanationStore,
        store_guard: Guard,
        recent: RecentIds,
        metrics: Metrics,
        timeout_s: float,
    ) -> None:
        self._registry = registry
        self._bus = bus
        self._store = store
        self._store_guard = store_guard
        self._recent = recent
        self._metrics = metrics
        self._timeout_s = timeout_s
        # Claim reads of concurrent requests travel together: one store request for many ids.
        self._reads: Coalescer[str, Claim | None] = Coalescer(
            self._read_claims, max_batch=CLAIMS_PER_REQUEST, max_in_flight=CLAIM_REQUESTS
        )

    async def decide(
        self,
        features: Mapping[str, Any],
        model_name: str | None,
        transaction_id: str | None,
        arrived: float | None = None,
    ) -> bytes:
        """The answer's bytes: a new decision, or the first answer given for a repeated id.

        `arrived` (time.monotonic()) is when the request reached the gateway: the deadline
        counts from then (from now when None).
        """
        try:
            fingerprint = request_hash(features, model_name)
        except TypeError:
            # orjson writes integers of up to 64 bits; a wider one is taken as the float a model
            # scores it as, for the fingerprint and the event alike (none could be encoded).
            features = _wide_integers_as_floats(features)
            fingerprint = request_hash(features, model_name)
        txn = transaction_id or uuid.uuid4().hex
        deadline = (time.monotonic() if arrived is None else arrived) + self._timeout_s
        # The event loop's clock is time.monotonic(), so the two deadlines are comparable.
        try:
            async with asyncio.timeout_at(deadline):
                if transaction_id is None:
                    # A fresh uuid cannot repeat: no claim to read.
                    model = self._model(model_name)
                    x = _encode(model, features)
                    decided = _new_claim(model, features, x, txn, fingerprint)
                    await self._publish(decided.event)
                    return decided.response
                try:
                    model = self._model(model_name)
                    x = _encode(model, features)
                except InvalidRequest as invalid:
                    return await self._answer_of_invalid(txn, fingerprint, invalid)
                return await self._decide_once(model, features, x, txn, fingerprint)
        except TimeoutError as exc:
            self._metrics.shed.labels(reason="deadline").inc()
            raise Overloaded(
                f"No decision within {self._timeout_s} s.", extra={"transaction_id": txn}
            ) from exc
        except Unavailable as exc:
            raise exc.for_transaction(txn) from exc

    async def _answer_of_invalid(
        self, txn: str, fingerprint: str, invalid: InvalidRequest
    ) -> bytes:
        """A request invalid for today's models may repeat one decided by another (the default
        model changed since): its id's answer stands. Otherwise, the request's own 422."""
        if (remembered := self._recent.answered(txn)) is not None:
            return self._repeat(remembered, fingerprint, "memory")
        try:
            stored = await self._reads.submit(txn)
        except Unavailable:
            stored = None  # the 422 is true either way: no need of the store to say it
        if stored is None:
            raise invalid
        return self._repeat(stored, fingerprint, "store")

    def _model(self, name: str | None) -> LoadedModel:
        try:
            return self._registry.active(name)
        except UnknownModel as exc:
            raise InvalidRequest(str(exc), [FieldProblem("model", str(exc))]) from exc

    async def _decide_once(
        self,
        model: LoadedModel,
        features: Mapping[str, Any],
        x: FloatMatrix,
        txn: str,
        fingerprint: str,
    ) -> bytes:
        while True:
            known = self._recent.answered(txn)
            if known is not None:
                return self._repeat(known, fingerprint, "memory")
            leader = self._recent.deciding(txn)
            if leader is None:
                break
            try:
                # The same id is being decided by another request of this process right now.
                first = await asyncio.shield(leader)
            except Exception:  # noqa: BLE001, S112 - its failure is its own; this one tries anew
                continue
            return self._repeat(first, fingerprint, "memory")
        self._recent.begin(txn)
        claim: Claim | None = None
        error: BaseException | None = None
        try:
            found = await self._reads.submit(txn)
            if found is not None:
                self._recent.remember(found)
                claim = found
                return self._repeat(found, fingerprint, "store")
            decided = _new_claim(model, features, x, txn, fingerprint)
            # Past the deadline here, the publish may still complete (the bus does not take a
            # queued event back): the client's retry then decides again, with the same answer,
            # and the worker keeps the first of the two events.
            await self._publish(decided.event)
            claim = decided.claim
            # Other gateways learn of it from its claim, which the worker writes with the record.
            self._recent.remember(claim)
            return claim.response
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._recent.finish(txn, claim, error)

    async def _read_claims(self, ids: Sequence[str]) -> dict[str, Claim | None]:
        self._metrics.claims_per_read.observe(len(ids))
        found = await self._store_guard.call(lambda: self._store.find_claims(ids))
        return {txn: found.get(txn) for txn in ids}

    async def drain(self) -> None:
        """Wait for the claim reads under way (before the store closes)."""
        await self._reads.close()

    def _repeat(self, claim: Claim, fingerprint: str, source: str) -> bytes:
        if claim.request_hash != fingerprint:
            reason = "already used for a different request"
            raise Conflict(
                f"Transaction id {claim.transaction_id!r} was {reason}.",
                [FieldProblem("transaction_id", reason)],
            )
        self._metrics.idempotent_replays.labels(source=source).inc()
        return claim.response

    async def _publish(self, event: DecisionEvent) -> None:
        try:
            await self._bus.publish(event)
        except Unavailable:
            self._metrics.publish_failures.inc()
            raise
        self._metrics.events_published.labels(event.model.name).inc()


class _NewClaim:
    """A decision just made: its event and the claim of its answer."""

    __slots__ = ("claim", "event")

    def __init__(self, event: DecisionEvent, claim: Claim) -> None:
        self.event = event
        self.claim = claim

    @property
    def response(self) -> bytes:
        return self.claim.response


def _wide_integers_as_floats(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and not -(2**63) <= value < 2**64:
        try:
            return float(value)
        except OverflowError:  # beyond any float: the registry refuses it as not finite
            return math.inf if value > 0 else -math.inf
    if isinstance(value, Mapping):
        return {key: _wide_integers_as_floats(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_wide_integers_as_floats(item) for item in value]
    return value


def _encode(model: LoadedModel, features: Mapping[str, Any]) -> FloatMatrix:
    try:
        return model.encode_many([features])
    except InvalidFeatures as exc:
        problems = [FieldProblem(f"features.{e.field}", e.reason) for e in exc.errors]
        raise InvalidRequest("Some features are invalid.", problems) from exc


def _new_claim(
    model: LoadedModel,
    features: Mapping[str, Any],
    x: FloatMatrix,
    txn: str,
    fingerprint: str,
) -> _NewClaim:
    event = DecisionEvent(
        transaction_id=txn,
        model=ModelRef(name=model.name, version=model.version),
        features=dict(features),
        prediction=model.prediction(model.predict_margins(x)[0]),
        decided_at=datetime.now(UTC),
        request_hash=fingerprint,
    )
    return _NewClaim(event, event.claim())
