"""The explainer worker: consume a batch, explain it, write it, then commit. Same for every bus.

One batch at a time: the next batch is not fetched before this one is committed, which is the
back-pressure (a slow store slows consumption, it never piles up tasks or memory).
"""

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

import numpy as np

from service.core.engine.base import Engine
from service.core.engine.fast import FastTreeShap
from service.core.explain import (
    DeadLetterReason,
    ExplainResult,
    Failure,
    explain_batch,
    group_by_version,
)
from service.core.formats.base import InvalidModel, UnsupportedModel
from service.core.ports import ConsumedBatch, EventSource, ExplanationStore, PopulationStore
from service.core.records import Claim, DecisionEvent, DecisionRecord
from service.core.registry import LoadedModel, ModelRegistry, UnknownModel
from service.errors import Unavailable
from service.metrics import Metrics
from service.settings import WorkerSettings
from workers.first_events import FirstEvents, Identity, Verdict
from workers.health import WorkerHealth
from workers.population import Placed, PopulationKeeper

log = logging.getLogger(__name__)

T = TypeVar("T")

# What a step may fail with and still succeed when retried: outages of the store or the bus.
TRANSIENT = (Unavailable, TimeoutError, OSError)


@dataclass(frozen=True)
class Step:
    """A retried step of a batch: what it does, what it depends on, and what to check."""

    name: str
    dependency: str
    hint: str


PLAN = Step(
    "explaining (loading model versions)",
    "store",
    "check that the store is reachable and holds the versions the events name",
)
DEAD_LETTER = Step(
    "dead-lettering",
    "dead-letter topic",
    "check that Kafka is reachable and the dead-letter topic exists",
)
WRITE = Step(
    "writing to the store",
    "store",
    "check that the explanation store (Cassandra) is reachable and migrated",
)
AGGREGATE = Step(
    "writing the population aggregates",
    "store",
    "check that the store is reachable and migrated (`shapstream db migrate`)",
)


@dataclass(frozen=True)
class Backoff:
    """Exponential delay between retries of a failing step, capped."""

    first_s: float = 0.5
    cap_s: float = 30.0

    def delay(self, attempt: int) -> float:
        return float(min(self.cap_s, self.first_s * 2 ** min(attempt, 30)))


class StopRequestedError(Exception):
    """Stop was requested while a step was being retried: the batch stays uncommitted."""


@dataclass
class _Plan:
    """What one batch turns into: records to write and payloads to dead-letter."""

    records: list[DecisionRecord] = field(default_factory=list)
    dead: list[tuple[bytes, DeadLetterReason]] = field(default_factory=list)
    # The consumed bytes of each event, so a dead letter carries exactly what was published.
    payloads: dict[str, bytes] = field(default_factory=dict)
    # Where each first event was read (source, offset), for the population aggregates.
    positions: dict[str, tuple[str, int]] = field(default_factory=dict)
    # The first event of each transaction id in the batch, and the later ones set aside.
    firsts: dict[str, DecisionEvent] = field(default_factory=dict)
    copies: int = 0
    conflicts: int = 0


@dataclass(frozen=True)
class _Explainer:
    model: LoadedModel
    engine: Engine


def choose_engine(model: LoadedModel, setting: str) -> tuple[Engine, str | None]:
    """The engine for `model`, and why it is not the fast one when `setting` is "auto".

    "pred_contribs" names the framework's own exact TreeSHAP (xgboost's pred_contribs,
    LightGBM's pred_contrib), the reference the fast engine is tested against.
    """
    if setting == "pred_contribs":
        return model.framework.reference_engine(), None
    try:
        return _fast_engine(model), None
    except UnsupportedModel as exc:
        return model.framework.reference_engine(), f"the fast engine cannot explain it ({exc})"


def _fast_engine(model: LoadedModel) -> FastTreeShap:
    """The native engine, once its expected value reproduces the framework's margin on an
    all-missing row (catches an intercept the conversion got wrong)."""
    engine = FastTreeShap(model.forest())
    probe = np.full((1, engine.n_features), np.nan, dtype=np.float32)
    ours = engine.contributions(probe).sum(axis=2).reshape(-1)
    theirs = model.framework.predict_margins(probe).reshape(-1)
    gap = np.abs(theirs - ours)
    if theirs.shape != ours.shape or np.any(gap > 1e-5 * (1.0 + np.abs(theirs))):
        raise UnsupportedModel(
            f"its expected value does not reproduce {model.format}'s margin "
            f"(objective {model.framework.objective})"
        )
    return engine


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class ExplainerWorker:
    """Turns consumed decision events into stored explanations, committing only what is stored."""

    def __init__(
        self,
        source: EventSource,
        store: ExplanationStore,
        registry: ModelRegistry,
        settings: WorkerSettings,
        metrics: Metrics,
        *,
        backoff: Backoff | None = None,
        health: WorkerHealth | None = None,
        population: PopulationStore | None = None,
    ) -> None:
        """`population`: where the population aggregates go (None: none are kept)."""
        self._source = source
        self._store = store
        self._registry = registry
        self._settings = settings
        self._metrics = metrics
        self._backoff = backoff or Backoff()
        self._health = health or WorkerHealth(settings.stall_after_s)
        self._explainers: OrderedDict[str, _Explainer] = OrderedDict()
        self._first_events = FirstEvents(settings.first_events)
        self._population = PopulationKeeper(population) if population is not None else None
        self._stop = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Process batches until `stop` is set; the batch in flight is finished first."""
        self._stop = stop
        while not stop.is_set():
            try:
                await self.process_once()
            except StopRequestedError:
                log.info("stopping with a batch uncommitted: it will be redelivered")
                return
            self._health.progressed()

    async def process_once(self) -> int:
        """Consume, explain, write and commit one batch; return its number of events."""
        batch = await self._source.next_batch(
            self._settings.batch_max, self._settings.batch_timeout_ms / 1000
        )
        if batch is None:
            return 0
        started = time.perf_counter()
        self._metrics.batch_size.observe(len(batch.payloads))
        plan = await self._retrying(PLAN, lambda: self._plan(batch))
        await self._retrying(DEAD_LETTER, lambda: self._send_dead_letters(plan.dead))
        await self._retrying(WRITE, lambda: self._write(plan))
        if self._population is not None and plan.records:
            await self._retrying(AGGREGATE, lambda: self._aggregate(plan))
        self._first_events.stored([plan.firsts[r.transaction_id] for r in plan.records])
        await batch.commit()
        self._observe_written(plan)
        self._metrics.batch_seconds.observe(time.perf_counter() - started)
        return len(batch.payloads)

    async def _retrying(self, step: Step, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run `attempt` until it succeeds; the batch is neither skipped nor committed."""
        failures = 0
        while True:
            try:
                result = await attempt()
            # The adapters raise their outages as `Unavailable` (their drivers' errors mapped):
            # retry rather than lose or skip events. Anything else is a bug, not an outage, and
            # retrying it forever under an outage's name would hide it: it stops the worker,
            # with its traceback, and the batch is redelivered to the next one.
            except TRANSIENT as exc:
                self._health.step_failed(step.name, step.dependency, step.hint, exc)
                delay = self._backoff.delay(failures)
                failures += 1
                log.warning(
                    "%s failed (attempt %d: %s: %s); retrying the same batch in %.1f s, "
                    "nothing is committed until it succeeds: %s",
                    step.name,
                    failures,
                    type(exc).__name__,
                    exc,
                    delay,
                    step.hint,
                )
            else:
                self._health.step_succeeded()
                return result
            try:
                async with asyncio.timeout(delay):
                    await self._stop.wait()
                raise StopRequestedError
            except TimeoutError:
                continue

    async def _plan(self, batch: ConsumedBatch) -> _Plan:
        plan = _Plan()
        events: list[DecisionEvent] = []
        payload_of: dict[int, bytes] = {}
        identities: dict[str, Identity] = {}
        for payload, position in zip(batch.payloads, batch.positions, strict=True):
            try:
                event = DecisionEvent.from_bytes(payload)
            except ValueError:
                plan.dead.append((payload, DeadLetterReason.MALFORMED))
                continue
            verdict = self._first_events.verdict(event, identities)
            if verdict is Verdict.SAME:
                plan.copies += 1
                continue
            if verdict is Verdict.CONFLICT:
                log.warning(
                    "transaction %s: a later event decides it differently; dead-lettered, the "
                    "first decision stands",
                    event.transaction_id,
                )
                plan.conflicts += 1
                plan.dead.append((payload, DeadLetterReason.CONFLICTING_ID))
                continue
            plan.firsts[event.transaction_id] = event
            events.append(event)
            payload_of[id(event)] = payload
            plan.payloads[event.transaction_id] = payload
            plan.positions[event.transaction_id] = position
        explained_at = datetime.now(UTC)
        for version, group in group_by_version(events).items():
            try:
                explainer = await self._explainer(version)
            except UnknownModel:
                log.warning(
                    "model version %s is unknown: %d events dead-lettered", version, len(group)
                )
                unknown = DeadLetterReason.UNKNOWN_MODEL_VERSION
                plan.dead.extend((payload_of[id(e)], unknown) for e in group)
                continue
            except InvalidModel as exc:
                log.error("model version %s cannot be loaded: %s", version, exc)
                invalid = DeadLetterReason.INVALID_MODEL
                plan.dead.extend((payload_of[id(e)], invalid) for e in group)
                continue
            result = await self._explain(explainer, group, explained_at)
            plan.records.extend(result.records)
            for failure in result.failures:
                log.warning(
                    "transaction %s dead-lettered (%s): %s",
                    failure.transaction_id,
                    failure.reason,
                    failure.detail,
                )
                plan.dead.append((payload_of[id(failure.event)], failure.reason))
        return plan

    async def _explain(
        self, explainer: _Explainer, events: list[DecisionEvent], explained_at: datetime
    ) -> ExplainResult:
        """Explain one version's events in a thread (CPU-bound), isolating events that crash it."""
        try:
            return await asyncio.to_thread(
                explain_batch, explainer.model, explainer.engine, events, explained_at
            )
        # A deterministic engine error: retrying the batch would block the partition, so find
        # the events that cause it and dead-letter only those.
        except Exception:
            if len(events) == 1:
                log.exception("explaining transaction %s failed", events[0].transaction_id)
                failure = Failure(events[0], DeadLetterReason.EXPLAIN_FAILED, "the engine raised")
                return ExplainResult(failures=[failure])
            log.exception("explaining a batch of %d events failed; one by one now", len(events))
        result = ExplainResult()
        for event in events:
            single = await self._explain(explainer, [event], explained_at)
            result.records.extend(single.records)
            result.failures.extend(single.failures)
        return result

    async def _explainer(self, version: str) -> _Explainer:
        cached = self._explainers.get(version)
        if cached is not None:
            self._explainers.move_to_end(version)
            return cached
        model = await self._registry.get_version(version, self._store.get_model)
        engine, fallback = await asyncio.to_thread(choose_engine, model, self._settings.engine)
        if fallback is None:
            log.info("model %s@%s: explained by %s", model.name, version, engine.name)
        else:
            self._metrics.engine_fallbacks.inc()
            log.warning(
                "model %s@%s: explained by %s because %s",
                model.name,
                version,
                engine.name,
                fallback,
            )
        explainer = _Explainer(model, engine)
        self._explainers[version] = explainer
        self._metrics.model_info.labels(name=model.name, version=version).set(1)
        while len(self._explainers) > self._settings.model_cache:
            self._explainers.popitem(last=False)
        return explainer

    async def _send_dead_letters(self, dead: list[tuple[bytes, DeadLetterReason]]) -> None:
        # Pop each one once it is acknowledged, so a retry does not publish it again.
        while dead:
            payload, reason = dead[0]
            await self._source.dead_letter(payload, reason)
            self._metrics.dead_letters.labels(reason=reason).inc()
            dead.pop(0)

    async def _write(self, plan: _Plan) -> None:
        if not plan.records:
            return
        try:
            await self._store.write(plan.records, self._claims(plan, plan.records))
        except ValueError:
            # The store refused a record's content (not an outage): find it, dead-letter it,
            # and write the others, instead of retrying a batch that can never succeed.
            plan.records = await self._write_one_by_one(plan)

    async def _aggregate(self, plan: _Plan) -> None:
        assert self._population is not None
        models = {
            version: (await self._explainer(version)).model
            for version in {r.model.version for r in plan.records}
        }
        placed = [Placed(record, *plan.positions[record.transaction_id]) for record in plan.records]
        await self._population.add(placed, models)

    def _claims(self, plan: _Plan, records: Sequence[DecisionRecord]) -> list[Claim]:
        """Each decision's claim, so that a repeat of its request reaching any gateway gets
        its answer (docs/decision-path.md)."""
        return [plan.firsts[record.transaction_id].claim() for record in records]

    async def _write_one_by_one(self, plan: _Plan) -> list[DecisionRecord]:
        written: list[DecisionRecord] = []
        for record in plan.records:
            try:
                await self._store.write([record], self._claims(plan, [record]))
            except ValueError as exc:
                log.error("transaction %s cannot be stored: %s", record.transaction_id, exc)
                payload, reason = plan.payloads[record.transaction_id], DeadLetterReason.UNSTORABLE
                await self._source.dead_letter(payload, reason)
                self._metrics.dead_letters.labels(reason=reason).inc()
                continue
            written.append(record)
        return written

    def _observe_written(self, plan: _Plan) -> None:
        if plan.copies:
            self._metrics.duplicate_events.labels(kind="same").inc(plan.copies)
        if plan.conflicts:
            self._metrics.duplicate_events.labels(kind="conflict").inc(plan.conflicts)
        for record in plan.records:
            self._metrics.explanations.labels(engine=record.engine).inc()
            freshness = _utc(record.explained_at) - _utc(record.decided_at)
            self._metrics.freshness_seconds.observe(max(freshness.total_seconds(), 0.0))
            self._metrics.additivity_error.observe(record.additivity_error)
