"""Keeping the population aggregates of the decisions a worker writes, exactly once.

Each (model version, UTC day, source) has one aggregate row holding every decision of that
source up to its `last_offset` (service/core/ports.py, AggregatePart). After a batch's records
are written and before it is committed, the rows it touches are rewritten whole, each with the
offset of the last event it counts. A batch redelivered after a crash (records written, offsets
not committed) finds those events at or below its rows' `last_offset` and does not count them
again: exactly once per row, without counters (which are neither idempotent nor TTL-able).

The rows a worker is writing are kept in memory (read once from the store when first needed,
so another worker can take a partition over); the oldest are dropped past `MAX_ROWS`.
"""

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date

import numpy as np

from service.core.population.aggregates import Aggregate, Binned, Edges
from service.core.population.reference import Reference
from service.core.ports import AggregatePart, PopulationStore
from service.core.records import DecisionRecord
from service.core.registry import LoadedModel

log = logging.getLogger(__name__)

# Rows held in memory: a few per source and day in steady state.
MAX_ROWS = 512

Key = tuple[str, date, str]


@dataclass(frozen=True, slots=True)
class Placed:
    """A written record and where its event was read (source, offset)."""

    record: DecisionRecord
    source: str
    offset: int


@dataclass(frozen=True, slots=True)
class _Row:
    last_offset: int
    aggregate: Aggregate


class PopulationKeeper:
    """Adds written records to their aggregate rows; see the module docstring."""

    def __init__(self, store: PopulationStore) -> None:
        self._store = store
        self._rows: OrderedDict[Key, _Row] = OrderedDict()
        self._edges: dict[str, Edges] = {}

    async def add(self, placed: Sequence[Placed], models: dict[str, LoadedModel]) -> int:
        """Count `placed` in their rows and write the rows; the number of records counted
        (those of a redelivered batch already counted are not)."""
        # Each version's records of the batch are binned once, for all the rows they go to.
        by_version: dict[str, list[int]] = {}
        groups: dict[Key, list[int]] = {}
        for index, item in enumerate(placed):
            version = item.record.model.version
            day = item.record.decided_at.astimezone(UTC).date()
            groups.setdefault((version, day, item.source), []).append(index)
            by_version.setdefault(version, []).append(index)
        # Where each record sits among its version's.
        within = {i: at for indices in by_version.values() for at, i in enumerate(indices)}
        binned: dict[str, Binned] = {}
        updated: dict[Key, _Row] = {}
        counted = 0
        for key, indices in groups.items():
            version = key[0]
            model = models[version]
            row = await self._row(key, model)
            new = [i for i in indices if placed[i].offset > row.last_offset]
            if not new:
                continue
            edges = await self._edges_of(model)
            if edges.fingerprint != row.aggregate.edges:
                log.error(
                    "population row %s is binned on other edges than version %s's: not counted",
                    key,
                    version,
                )
                continue
            if version not in binned:
                records = [placed[i].record for i in by_version[version]]
                binned[version] = Binned.of(records, model.schema, edges)
            rows = np.array([within[i] for i in new], dtype=np.intp)
            added = binned[version].aggregate(rows)
            updated[key] = _Row(max(placed[i].offset for i in new), row.aggregate.merged(added))
            counted += len(new)
        if updated:
            await self._store.put_parts(
                [
                    AggregatePart(version, day, source, row.last_offset, row.aggregate.to_bytes())
                    for (version, day, source), row in updated.items()
                ]
            )
            # Only once stored: a failed write is retried from the rows as they were.
            for key, row in updated.items():
                self._remember(key, row)
        return counted

    async def _row(self, key: Key, model: LoadedModel) -> _Row:
        row = self._rows.get(key)
        if row is not None:
            self._rows.move_to_end(key)
            return row
        stored = await self._store.get_part(*key)
        if stored is None:
            edges = await self._edges_of(model)
            row = _Row(-1, Aggregate.empty(model.schema, edges))
        else:
            row = _Row(stored.last_offset, Aggregate.from_bytes(stored.aggregate))
        self._remember(key, row)
        return row

    async def _edges_of(self, model: LoadedModel) -> Edges:
        edges = self._edges.get(model.version)
        if edges is None:
            stored = await self._store.get_reference(model.version)
            if stored is None:
                edges = Edges.default(model.schema)
            else:
                edges = Reference.from_bytes(stored).edges
            self._edges[model.version] = edges
        return edges

    def _remember(self, key: Key, row: _Row) -> None:
        self._rows[key] = row
        self._rows.move_to_end(key)
        while len(self._rows) > MAX_ROWS:
            self._rows.popitem(last=False)
