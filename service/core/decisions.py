"""Deciding: validate, score, publish once per transaction id, answer."""

import hashlib
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from service.core.records import Claim, DecisionEvent, ModelRef, Prediction, Wire
from service.core.registry import InvalidFeatures, LoadedModel, ModelRegistry, UnknownModel
from service.errors import BusUnavailable, Conflict, FieldProblem, InvalidRequest
from service.metrics import Metrics
from service.ports import EventBus, ExplanationStore


class DecisionResponse(Wire):
    """The gateway's answer; stored with the claim so a repeat gets exactly the same bytes."""

    transaction_id: str
    model: ModelRef
    prediction: Prediction

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json", by_alias=True))


def request_hash(features: Mapping[str, Any], model: str | None) -> str:
    """Fingerprint of what the client asked, to tell a retry from a conflicting reuse of an id."""
    canonical = orjson.dumps({"features": features, "model": model}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


class Decider:
    """Turns one request into one decision, published exactly once per transaction id."""

    def __init__(
        self,
        registry: ModelRegistry,
        bus: EventBus,
        store: ExplanationStore,
        metrics: Metrics,
    ) -> None:
        self._registry = registry
        self._bus = bus
        self._store = store
        self._metrics = metrics

    async def decide(
        self,
        features: Mapping[str, Any],
        model_name: str | None,
        transaction_id: str | None,
    ) -> DecisionResponse:
        model = self._model(model_name)
        prediction = _score(model, features)
        txn = transaction_id or uuid.uuid4().hex
        event = DecisionEvent(
            transaction_id=txn,
            model=ModelRef(name=model.name, version=model.version),
            features=dict(features),
            prediction=prediction,
            decided_at=datetime.now(UTC),
        )
        response = DecisionResponse(transaction_id=txn, model=event.model, prediction=prediction)
        fingerprint = request_hash(features, model_name)
        if transaction_id is None:
            # A fresh uuid cannot collide: the claim is needed only if the client must retry.
            await self._publish_or_claim(event, _claim(event, response, fingerprint))
            return response
        return await self._decide_once(event, _claim(event, response, fingerprint), response)

    def _model(self, name: str | None) -> LoadedModel:
        try:
            return self._registry.active(name)
        except UnknownModel as exc:
            raise InvalidRequest(str(exc), [FieldProblem("model", str(exc))]) from exc

    async def _publish_or_claim(self, event: DecisionEvent, claim: Callable[[], Claim]) -> None:
        try:
            await self._publish(event)
        except BusUnavailable as exc:
            await self._store.claim(claim())
            raise _retry_with(event.transaction_id, exc) from exc

    async def _decide_once(
        self, event: DecisionEvent, claim: Callable[[], Claim], response: DecisionResponse
    ) -> DecisionResponse:
        mine = claim()
        existing = await self._store.claim(mine)
        if existing is None:
            await self._publish_claimed(event)
            return response
        if existing.request_hash != mine.request_hash:
            reason = "already used for a different request"
            raise Conflict(
                f"Transaction id {event.transaction_id!r} was {reason}.",
                [FieldProblem("transaction_id", reason)],
            )
        if not existing.published:
            # The first attempt was answered 503: the event may never have reached the bus.
            await self._publish_claimed(DecisionEvent.from_bytes(existing.event))
        return DecisionResponse.model_validate_json(existing.response)

    async def _publish_claimed(self, event: DecisionEvent) -> None:
        try:
            await self._publish(event)
        except BusUnavailable as exc:
            raise _retry_with(event.transaction_id, exc) from exc
        await self._store.mark_published(event.transaction_id)

    async def _publish(self, event: DecisionEvent) -> None:
        try:
            await self._bus.publish(event)
        except BusUnavailable:
            self._metrics.publish_failures.inc()
            raise
        self._metrics.events_published.labels(event.model.name).inc()


def _score(model: LoadedModel, features: Mapping[str, Any]) -> Prediction:
    try:
        x = model.encode_many([features])
    except InvalidFeatures as exc:
        problems = [FieldProblem(f"features.{e.field}", e.reason) for e in exc.errors]
        raise InvalidRequest("Some features are invalid.", problems) from exc
    return model.prediction(model.predict_margins(x)[0])


def _claim(
    event: DecisionEvent, response: DecisionResponse, fingerprint: str
) -> Callable[[], Claim]:
    """The claim, built only when needed: serialising it costs more than the happy path."""
    return lambda: Claim(
        transaction_id=event.transaction_id,
        request_hash=fingerprint,
        response=response.to_bytes(),
        event=event.to_bytes(),
    )


def _retry_with(transaction_id: str, cause: BusUnavailable) -> BusUnavailable:
    return BusUnavailable(
        f"{cause.detail} Retry with the same transaction_id; it will not be decided twice.",
        extra={"transaction_id": transaction_id},
    )
