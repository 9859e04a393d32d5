"""A model version's reference: the population its production decisions are compared with.

Made once per version, from a reference sample explained exactly (the validation set, with
`shapstream model init --reference DATA.csv`), or frozen from production days
(`shapstream model freeze-reference`). It holds the version's frozen bin edges (about 20
quantile bins of the reference's attributions and numeric inputs, plus under- and overflow)
and the reference's own aggregate on them: its importance and histograms.

A version's production aggregates are binned on its reference's edges when the reference
exists before the version's first decision, else on the default grid (aggregates.Edges.default),
which a reference frozen later from production keeps.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import orjson

from service.core.population.aggregates import DEFAULT_GRID, Aggregate, Edges, FloatArray
from service.core.population.drift import quantile_edges
from service.core.records import DecisionRecord
from service.core.schema import FeatureType, ModelSchema

REFERENCE_FILE = "reference.bin"
FORMAT = 1
BINS = 20


@dataclass(frozen=True)
class Reference:
    edges: Edges
    aggregate: Aggregate
    # Where it came from, for people: "validation set german_credit.csv (300 rows)".
    source: str

    def to_bytes(self) -> bytes:
        header = {"format": FORMAT, "source": self.source, "edges": self.edges.to_json()}
        return (
            orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
            + b"\n"
            + (self.aggregate.to_bytes())
        )

    @classmethod
    def from_bytes(cls, blob: bytes) -> "Reference":
        head, _, body = blob.partition(b"\n")
        header = orjson.loads(head)
        if header["format"] != FORMAT:
            raise ValueError(f"unknown reference format {header['format']!r}")
        edges = Edges.from_json(header["edges"])
        aggregate = Aggregate.from_bytes(body)
        if aggregate.edges != edges.fingerprint:
            raise ValueError("the reference's aggregate was binned on other edges than its own")
        return cls(edges, aggregate, header["source"])


def reference_edges(
    records: Sequence[DecisionRecord], schema: ModelSchema, bins: int = BINS
) -> Edges:
    """Quantile edges of the records' stored attributions and numeric inputs."""
    phi = np.asarray([r.attributions for r in records], dtype=np.float32).astype(np.float64)
    attributions = [
        [quantile_edges(phi[:, o, f], bins) for f in range(len(schema.features))]
        for o in range(schema.outputs)
    ]
    inputs: list[FloatArray | None] = []
    for feature in schema.features:
        if feature.type is not FeatureType.NUMERIC:
            inputs.append(None)
            continue
        values = [r.features.get(feature.name) for r in records]
        present = np.array([v for v in values if isinstance(v, int | float)], dtype=np.float64)
        # A feature the reference never gives has no quantiles: the default grid bins it.
        inputs.append(quantile_edges(present, bins) if present.size else DEFAULT_GRID)
    return Edges.of(attributions, inputs)


def reference_of_records(
    records: Sequence[DecisionRecord], schema: ModelSchema, source: str
) -> Reference:
    """The reference of explained reference decisions: its edges, and its aggregate on them."""
    if not records:
        raise ValueError("a reference needs at least one decision")
    edges = reference_edges(records, schema)
    return Reference(edges, Aggregate.of_records(records, schema, edges), source)


def freeze(aggregate: Aggregate, schema: ModelSchema, source: str) -> Reference:
    """The reference frozen from production: the aggregate of its days, on the default edges it
    was binned on (`shapstream model freeze-reference`). The version's aggregates keep those
    edges, so its later days compare with it bin for bin."""
    edges = Edges.default(schema)
    if aggregate.edges != edges.fingerprint:
        raise ValueError("the decisions were not binned on the default edges of this schema")
    if aggregate.count == 0:
        raise ValueError("a reference needs at least one decision")
    return Reference(edges, aggregate, source)
