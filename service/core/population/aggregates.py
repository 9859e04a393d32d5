"""Population aggregates of stored decisions, kept as decisions are written, merged on demand.

An `Aggregate` holds, for a set of decisions of one model version: their count; per (output,
feature) the sums of phi, |phi| and phi^2 and a histogram of signed phi on the version's frozen
edges; per feature a histogram of the input values; outcomes; reason families among denials;
a histogram of the protected share. Aggregates of disjoint sets add up (`merged`), so a window
of days is the sum of its days and nothing is ever recomputed from the records.

Attributions are taken as stored (rounded to float32), so an aggregate equals a recomputation
from the stored records.
"""

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import orjson
from numpy.typing import NDArray

from service.core.records import BinaryPrediction, DecisionRecord, MulticlassPrediction
from service.core.schema import FeatureType, ModelSchema

FloatArray = NDArray[np.float64]
CountArray = NDArray[np.int64]

# Edges for a version without a reference: 0 and +-{1, 2, 5} x 10^k for k in -4..5, which bins
# attributions (log-odds, ~1e-3 to ~5) and raw inputs (amounts, ages, durations) alike.
_STEPS = [m * 10.0**k for k in range(-4, 6) for m in (1.0, 2.0, 5.0)]
DEFAULT_GRID = np.array([-s for s in reversed(_STEPS)] + [0.0] + _STEPS)
# Protected share (0 to 1) in tenths.
SHARE_BINS = 10
FORMAT = 1


@dataclass(frozen=True)
class Edges:
    """A model version's frozen bin edges: attributions per (output, feature), numeric inputs
    per feature (None for a categorical feature, binned by its categories)."""

    attributions: tuple[tuple[FloatArray, ...], ...]
    inputs: tuple[FloatArray | None, ...]
    # Identifies the edges: only aggregates binned on the same edges are merged or compared.
    fingerprint: str = field(default="", compare=False)

    @classmethod
    def of(
        cls,
        attributions: Sequence[Sequence[FloatArray]],
        inputs: Sequence[FloatArray | None],
    ) -> "Edges":
        frozen = tuple(tuple(np.asarray(e, dtype=np.float64) for e in row) for row in attributions)
        numeric = tuple(None if e is None else np.asarray(e, dtype=np.float64) for e in inputs)
        return cls(frozen, numeric, _fingerprint(frozen, numeric))

    @classmethod
    def default(cls, schema: ModelSchema) -> "Edges":
        """The edges of a version that has no reference: one fixed grid for everything."""
        row = [DEFAULT_GRID] * len(schema.features)
        inputs = [DEFAULT_GRID if f.type is FeatureType.NUMERIC else None for f in schema.features]
        return cls.of([row] * schema.outputs, inputs)

    def to_json(self) -> dict[str, object]:
        return {
            "attributions": [[e.tolist() for e in row] for row in self.attributions],
            "inputs": [None if e is None else e.tolist() for e in self.inputs],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> "Edges":
        rows = data["attributions"]
        inputs = data["inputs"]
        assert isinstance(rows, list)
        assert isinstance(inputs, list)
        return cls.of(
            [[np.asarray(e, dtype=np.float64) for e in row] for row in rows],
            [None if e is None else np.asarray(e, dtype=np.float64) for e in inputs],
        )

    @property
    def width(self) -> int:
        """Bins of an attribution histogram: under- and overflow around the widest edges."""
        return max(len(e) for row in self.attributions for e in row) + 1

    def input_width(self, schema: ModelSchema) -> int:
        """Bins of an input histogram: a numeric one's, or a category each; plus "missing"."""
        widths = [
            len(e) + 1 if e is not None else len(f.categories)
            for e, f in zip(self.inputs, schema.features, strict=True)
        ]
        return max(widths) + 1


def _fingerprint(
    attributions: tuple[tuple[FloatArray, ...], ...], inputs: tuple[FloatArray | None, ...]
) -> str:
    digest = hashlib.sha256()
    for row in attributions:
        for edges in row:
            digest.update(edges.astype("<f8").tobytes() + b"|")
        digest.update(b"/")
    for numeric in inputs:
        digest.update(b"c" if numeric is None else numeric.astype("<f8").tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16]


@dataclass
class Aggregate:
    """Sums and histograms of a set of decisions of one model version (see the module doc)."""

    edges: str
    count: int
    sum: FloatArray  # (outputs, features)
    abs_sum: FloatArray
    sq_sum: FloatArray
    hist: CountArray  # (outputs, features, width)
    inputs: CountArray  # (features, input width); the last bin counts missing values
    outcomes: dict[str, int]
    denials: int
    reasons: dict[str, int]
    shares: CountArray  # (SHARE_BINS,)

    @classmethod
    def empty(cls, schema: ModelSchema, edges: Edges) -> "Aggregate":
        shape = (schema.outputs, len(schema.features))
        return cls(
            edges=edges.fingerprint,
            count=0,
            sum=np.zeros(shape),
            abs_sum=np.zeros(shape),
            sq_sum=np.zeros(shape),
            hist=np.zeros((*shape, edges.width), dtype=np.int64),
            inputs=np.zeros((len(schema.features), edges.input_width(schema)), dtype=np.int64),
            outcomes={},
            denials=0,
            reasons={},
            shares=np.zeros(SHARE_BINS, dtype=np.int64),
        )

    @classmethod
    def of_records(
        cls, records: Sequence[DecisionRecord], schema: ModelSchema, edges: Edges
    ) -> "Aggregate":
        """The aggregate of `records` (all of one model version, whose schema is `schema`)."""
        return Binned.of(records, schema, edges).aggregate(np.arange(len(records)))

    def merged(self, other: "Aggregate") -> "Aggregate":
        """The aggregate of both sets (which must be disjoint and binned on the same edges)."""
        if other.edges != self.edges:
            raise ValueError("aggregates binned on different edges cannot be merged")
        return Aggregate(
            edges=self.edges,
            count=self.count + other.count,
            sum=self.sum + other.sum,
            abs_sum=self.abs_sum + other.abs_sum,
            sq_sum=self.sq_sum + other.sq_sum,
            hist=self.hist + other.hist,
            inputs=self.inputs + other.inputs,
            outcomes=_add(self.outcomes, other.outcomes),
            denials=self.denials + other.denials,
            reasons=_add(self.reasons, other.reasons),
            shares=self.shares + other.shares,
        )

    def to_bytes(self) -> bytes:
        """A compact header (JSON, one line) and the arrays' little-endian bytes after it."""
        header = {
            "format": FORMAT,
            "edges": self.edges,
            "count": self.count,
            "shape": list(self.hist.shape),
            "inputs": list(self.inputs.shape),
            "outcomes": self.outcomes,
            "denials": self.denials,
            "reasons": self.reasons,
        }
        arrays = [self.sum, self.abs_sum, self.sq_sum]
        body = b"".join(a.astype("<f8").tobytes() for a in arrays)
        counts = [self.hist, self.inputs, self.shares]
        body += b"".join(a.astype("<i8").tobytes() for a in counts)
        return orjson.dumps(header, option=orjson.OPT_SORT_KEYS) + b"\n" + body

    @classmethod
    def from_bytes(cls, blob: bytes) -> "Aggregate":
        head, _, body = blob.partition(b"\n")
        header = orjson.loads(head)
        if header["format"] != FORMAT:
            raise ValueError(f"unknown aggregate format {header['format']!r}")
        outputs, features, width = header["shape"]
        cells = outputs * features
        floats = np.frombuffer(body, dtype="<f8", count=3 * cells).reshape(3, outputs, features)
        counts = np.frombuffer(body, dtype="<i8", offset=3 * cells * 8)
        hist_end = cells * width
        input_end = hist_end + int(np.prod(header["inputs"]))
        return cls(
            edges=header["edges"],
            count=header["count"],
            sum=floats[0].astype(np.float64),
            abs_sum=floats[1].astype(np.float64),
            sq_sum=floats[2].astype(np.float64),
            hist=counts[:hist_end].reshape(outputs, features, width).astype(np.int64),
            inputs=counts[hist_end:input_end].reshape(header["inputs"]).astype(np.int64),
            outcomes=header["outcomes"],
            denials=header["denials"],
            reasons=header["reasons"],
            shares=counts[input_end : input_end + SHARE_BINS].astype(np.int64),
        )


@dataclass(frozen=True)
class Binned:
    """Records of one model version, binned once: `aggregate` sums any subset of them.

    A worker's batch holds decisions of several sources and days (several aggregate rows):
    binning the batch once and summing each row's share with array operations costs one
    Python pass over the records per batch, not one per row.
    """

    schema: ModelSchema
    edges: Edges
    # As stored: float32 values (service/core/integrity.py's canonical form), (n, outputs,
    # features).
    phi: FloatArray
    # Each record's cell in the flattened (outputs, features, width) histogram, per (output,
    # feature); and in the flattened (features, input width) one, per feature.
    cells: NDArray[np.intp]
    input_cells: NDArray[np.intp]
    # Each record's outcome (an index into `outcome_names`), whether it is a denial, the
    # reason families (schema order) among its reasons, and its protected share's bin (-1:
    # none).
    outcome_names: tuple[str, ...]
    outcomes: NDArray[np.intp]
    denied: NDArray[np.bool_]
    families: NDArray[np.bool_]
    shares: NDArray[np.intp]

    @classmethod
    def of(cls, records: Sequence[DecisionRecord], schema: ModelSchema, edges: Edges) -> "Binned":
        n, features = len(records), len(schema.features)
        phi = np.asarray([r.attributions for r in records], dtype=np.float32).astype(np.float64)
        phi = phi.reshape(n, schema.outputs, features)
        width = edges.width
        cells = np.empty((n, schema.outputs * features), dtype=np.intp)
        for o in range(schema.outputs):
            for f in range(features):
                column = o * features + f
                index = bin_index(phi[:, o, f], edges.attributions[o][f])
                cells[:, column] = column * width + index
        names = schema.feature_names
        table = ([r.features.get(name) for name in names] for r in records)
        columns = list(zip(*table, strict=True))
        input_width = edges.input_width(schema)
        input_cells = np.empty((n, features), dtype=np.intp)
        for f, feature in enumerate(schema.features):
            values = columns[f] if columns else ()
            bins = _input_bins(values, feature.categories, edges.inputs[f], input_width - 1)
            input_cells[:, f] = f * input_width + bins
        outcome_names, outcome_codes = np.unique([outcome(r) for r in records], return_inverse=True)
        denied = np.array([is_denial(r) for r in records], dtype=np.bool_)
        family_index = {family.name: i for i, family in enumerate(schema.families)}
        families = np.zeros((n, len(family_index)), dtype=np.bool_)
        for i, record in enumerate(records):
            if denied[i]:
                for reason in record.reasons:
                    families[i, family_index[reason.family]] = True
        shares = np.array(
            [-1 if r.protected_share is None else _share_bin(r.protected_share) for r in records],
            dtype=np.intp,
        )
        return cls(
            schema,
            edges,
            phi,
            cells,
            input_cells,
            tuple(str(name) for name in outcome_names),
            outcome_codes.astype(np.intp).reshape(n),
            denied,
            families,
            shares,
        )

    def aggregate(self, rows: NDArray[np.intp]) -> Aggregate:
        """The aggregate of the records at `rows`."""
        aggregate = Aggregate.empty(self.schema, self.edges)
        if not len(rows):
            return aggregate
        phi = self.phi[rows]
        aggregate.count = len(rows)
        aggregate.sum = phi.sum(axis=0)
        aggregate.abs_sum = np.abs(phi).sum(axis=0)
        aggregate.sq_sum = np.square(phi).sum(axis=0)
        aggregate.hist = np.bincount(
            self.cells[rows].ravel(), minlength=aggregate.hist.size
        ).reshape(aggregate.hist.shape)
        aggregate.inputs = np.bincount(
            self.input_cells[rows].ravel(), minlength=aggregate.inputs.size
        ).reshape(aggregate.inputs.shape)
        outcomes = np.bincount(self.outcomes[rows], minlength=len(self.outcome_names))
        aggregate.outcomes = {
            name: int(count)
            for name, count in zip(self.outcome_names, outcomes, strict=True)
            if count
        }
        aggregate.denials = int(self.denied[rows].sum())
        given = self.families[rows].sum(axis=0)
        aggregate.reasons = dict(
            sorted(
                (family.name, int(count))
                for family, count in zip(self.schema.families, given, strict=True)
                if count
            )
        )
        shares = self.shares[rows]
        aggregate.shares = np.bincount(shares[shares >= 0], minlength=SHARE_BINS).astype(np.int64)
        return aggregate


def _input_bins(
    values: Sequence[object],
    categories: Sequence[str],
    numeric: FloatArray | None,
    missing: int,
) -> NDArray[np.intp]:
    """Each value's bin: a numeric one's on `numeric`, a category's code, else `missing`."""
    if numeric is not None:
        present = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        return np.where(np.isnan(present), missing, bin_index(present, numeric))
    codes = {c: i for i, c in enumerate(categories)}
    return np.array(
        [codes.get(v, missing) if isinstance(v, str) else missing for v in values], dtype=np.intp
    )


def merge_all(aggregates: Iterable[Aggregate]) -> Aggregate | None:
    """The sum of `aggregates` (None when there are none)."""
    total: Aggregate | None = None
    for aggregate in aggregates:
        total = aggregate if total is None else total.merged(aggregate)
    return total


def outcome(record: DecisionRecord) -> str:
    """What a decision counts as: approve/deny, the class of a multiclass one, else "value"."""
    prediction = record.prediction
    if isinstance(prediction, BinaryPrediction):
        return prediction.decision
    if isinstance(prediction, MulticlassPrediction):
        return prediction.label
    return "value"


def is_denial(record: DecisionRecord) -> bool:
    prediction = record.prediction
    return isinstance(prediction, BinaryPrediction) and prediction.decision == "deny"


def bin_index(values: FloatArray, edges: FloatArray) -> NDArray[np.intp]:
    """0 below the first edge, i for [edges[i-1], edges[i]), len(edges) at or above the last."""
    return np.searchsorted(edges, values, side="right")


def _share_bin(share: float) -> int:
    return min(max(int(share * SHARE_BINS), 0), SHARE_BINS - 1)


def _add(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    # Sorted: the bytes of an aggregate depend on its counts only.
    total = dict(a)
    for key, value in b.items():
        total[key] = total.get(key, 0) + value
    return dict(sorted(total.items()))
