"""The seams of the core: the event bus and its source, the explanation and access stores."""

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Protocol

from service.core.access import AccessEntry, ApiKey
from service.core.records import (
    Claim,
    DecisionCursor,
    DecisionEvent,
    DecisionRecord,
    DecisionSummary,
    ModelArtifact,
)


@dataclass(frozen=True, slots=True)
class BusStatus:
    """Whether decisions can be taken now, and whether they wait in a local spool."""

    accepting: bool
    spooling: bool = False
    spooled_events: int = 0
    spooled_bytes: int = 0
    detail: str = ""


class EventBus(Protocol):
    """Where the gateway publishes decisions (Kafka, or the embedded outbox)."""

    async def publish(self, event: DecisionEvent) -> None:
        """Return once the event is durable; raise `BusUnavailable` past the deadline."""
        ...

    async def ping(self) -> None: ...

    def status(self) -> BusStatus:
        """What readiness reports of the bus, without waiting on the network."""
        ...

    async def close(self) -> None: ...


class ConsumedBatch(Protocol):
    """Events handed to a worker; `commit` acknowledges all of them."""

    @property
    def payloads(self) -> Sequence[bytes]: ...

    @property
    def positions(self) -> Sequence[tuple[str, int]]:
        """Where each payload was read (source, offset), in the same order: offsets grow
        within a source, and a redelivered event has the same position."""
        ...

    async def commit(self) -> None: ...


class EventSource(Protocol):
    """What a worker consumes from (Kafka consumer group, or the embedded outbox)."""

    async def next_batch(self, max_events: int, timeout_s: float) -> ConsumedBatch | None: ...

    async def dead_letter(self, payload: bytes, reason: str) -> None: ...

    async def close(self) -> None: ...


class ModelConflictError(ValueError):
    """A model version is already stored with different content (versions are content hashes)."""


class ExplanationStore(Protocol):
    """Durable decision records, model versions and transaction claims."""

    async def migrate(self) -> None:
        """Create the schema if it is missing; safe to run any number of times."""
        ...

    async def put_model(self, artifact: ModelArtifact) -> None:
        """Store a version once; raise `ModelConflictError` if it differs from the stored one."""
        ...

    async def get_model(self, version: str) -> ModelArtifact | None: ...

    async def find_claims(self, transaction_ids: Sequence[str]) -> dict[str, Claim]:
        """The claims stored for these ids (absent ones left out): quorum reads, no consensus."""
        ...

    async def write(self, records: Sequence[DecisionRecord], claims: Sequence[Claim] = ()) -> None:
        """Upsert a batch of records and of claims; writing the same again changes nothing.

        A claim is an idempotent upsert too: the last write of an id wins.
        """
        ...

    async def get(self, transaction_id: str) -> DecisionRecord | None: ...

    async def model_versions(self) -> list[str]:
        """Every model version ever stored with `put_model`, sorted."""
        ...

    async def model_names(self) -> dict[str, str]:
        """The name of every stored model version, by version."""
        ...

    async def recent(
        self,
        model_version: str,
        day: date,
        limit: int,
        before: DecisionCursor | None = None,
        decision: str | None = None,
    ) -> list[DecisionSummary]:
        """Up to `limit` decisions of `model_version` on `day` (UTC), newest first, strictly
        before `before`, only those whose decision text is `decision` when given."""
        ...

    def scan(
        self, model_version: str, start: datetime, end: datetime
    ) -> AsyncGenerator[DecisionRecord, None]:
        """Records of `model_version` decided in [start, end), in constant memory.

        The order is deterministic but not global time order (Cassandra reads its time
        buckets one after the other); close the iterator (`contextlib.aclosing`) to stop early.
        """
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class AccessStore(Protocol):
    """API keys (by hash) and the access log; shares the explanation store's connection."""

    async def migrate(self) -> None:
        """Create the tables if they are missing; safe to run any number of times."""
        ...

    async def put_key(self, key: ApiKey) -> None: ...

    async def get_key(self, key_hash: str) -> ApiKey | None: ...

    async def delete_key(self, key_hash: str) -> None: ...

    async def keys(self) -> list[ApiKey]:
        """Every stored key (for `shapstream keys list`), oldest first."""
        ...

    async def record(self, entry: AccessEntry) -> None:
        """Append to the access log; raise if it was not stored (the read must not proceed)."""
        ...

    async def record_many(self, entries: Sequence[AccessEntry]) -> None:
        """Append several entries in as few requests as the store allows; raise if any failed."""
        ...

    async def entries(self, start: datetime, end: datetime, limit: int) -> list[AccessEntry]:
        """Entries with `start <= at < end`, oldest first, at most `limit`."""
        ...


@dataclass(frozen=True, slots=True)
class AggregatePart:
    """The population aggregate (service/core/population) of the decisions of one model
    version and UTC day that came from one source (a Kafka partition, or the embedded outbox),
    up to and including the event at `last_offset` there.

    A worker rewrites the whole row after each batch, before committing it: a redelivered
    batch finds its events at or below `last_offset` already counted, and skips them.
    """

    model_version: str
    day: date
    source: str
    last_offset: int
    aggregate: bytes


class PopulationStore(Protocol):
    """Population aggregates and each model version's reference; on the records' connection."""

    async def migrate(self) -> None: ...

    async def get_part(
        self, model_version: str, day: date, source: str
    ) -> AggregatePart | None: ...

    async def put_parts(self, parts: Sequence[AggregatePart]) -> None:
        """Upsert whole rows; kept as long as the records (the retention)."""
        ...

    async def parts(self, model_version: str, days: Sequence[date]) -> list[AggregatePart]:
        """Every part of these days of `model_version`."""
        ...

    async def put_reference(self, model_version: str, reference: bytes) -> bool:
        """Store a version's reference unless it has one: True if this one was stored (a
        reference never changes once set)."""
        ...

    async def get_reference(self, model_version: str) -> bytes | None: ...
