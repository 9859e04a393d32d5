"""shapstream's native engines for any tree ensemble, read from a `Forest`.

A format module (``service/core/formats/``) turns its framework's model into a Forest; the
compiled kernel (``_native/``) then reads the Forest's arrays, whatever framework trained
them: every node routes a row by its `NodeFlag` bits, leaves add up as the Forest's
`Accumulation` says, and the sum is divided by its divisor.

`FastTreeShap` is exact path-dependent TreeSHAP: it extracts every leaf's root path
(distinct features, their cover ratios), tabulates the path's SHAP weights over all 2^d
subsets of "row follows the path" patterns, and evaluates whole batches in native code, one
thread per call. Its attributions are in margin space and sum to the margin.

`FastPredictor` gives raw margins bit for bit as the framework computes them (xgboost's
float32 sums, scikit-learn's float64 sums and averages); `mismatch` says where they do not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.core.engine.base import Contributions, FloatMatrix
from service.core.formats.base import Accumulation, Forest, NodeFlag, UnsupportedModel

__all__ = ["BuildStats", "FastPredictor", "FastTreeShap"]

ENGINE_NAME = "shapstream"
# Leaves with more distinct path features than this are evaluated without tables.
DEFAULT_DMAX = 12
# Upper bound on the precomputed tables; dmax is lowered until the model fits.
DEFAULT_TABLE_LIMIT_BYTES = 2 * 1024**3


@dataclass(frozen=True, slots=True)
class BuildStats:
    """What building the TreeSHAP tables of one forest cost (seconds, bytes of native memory)."""

    precompute_seconds: float
    memory_bytes: int
    trees: int
    leaves: int
    table_entries: int
    direct_leaves: int
    dmax: int


def _native() -> Any:
    try:
        from service.core.engine._native import _treeshap
    except ImportError as exc:  # pragma: no cover - depends on the build
        raise UnsupportedModel(
            "the compiled TreeSHAP kernel is not built (run `pip install -e .`)"
        ) from exc
    return _treeshap


def _arrays(forest: Forest) -> tuple[Any, ...]:
    """The Forest as the kernel's build() and predictor() read it (their first 15 arguments)."""
    return (
        forest.n_features,
        forest.n_outputs,
        np.ascontiguousarray(forest.tree_ptr, dtype=np.int64),
        np.ascontiguousarray(forest.tree_output, dtype=np.int32),
        np.ascontiguousarray(forest.left, dtype=np.int32),
        np.ascontiguousarray(forest.right, dtype=np.int32),
        np.ascontiguousarray(forest.feature, dtype=np.int32),
        np.ascontiguousarray(forest.threshold, dtype=np.float64),
        np.ascontiguousarray(forest.flags, dtype=np.uint8),
        np.ascontiguousarray(forest.cat_ptr, dtype=np.int64),
        np.ascontiguousarray(forest.cat_words, dtype=np.uint32),
        np.ascontiguousarray(forest.value, dtype=np.float64),
        np.ascontiguousarray(forest.cover, dtype=np.float64),
        np.ascontiguousarray(forest.base, dtype=np.float64),
        float(forest.divisor),
    )


class FastTreeShap:
    """Exact path-dependent TreeSHAP of one forest (the `Engine` protocol)."""

    name: str = ENGINE_NAME

    def __init__(
        self,
        forest: Forest,
        *,
        dmax: int = DEFAULT_DMAX,
        table_limit_bytes: int = DEFAULT_TABLE_LIMIT_BYTES,
    ) -> None:
        """Build the tables; raises UnsupportedModel when the kernel cannot read `forest`."""
        self.n_features = forest.n_features
        self.n_outputs = forest.n_outputs
        native = _native()
        arrays = _arrays(forest)
        t0 = time.perf_counter()
        while True:
            try:
                cap = native.build(*arrays, dmax, table_limit_bytes)
                break
            except ValueError as exc:
                if "memory limit" in str(exc) and dmax > 0:
                    dmax -= 1
                    continue
                raise UnsupportedModel(str(exc)) from exc
        precompute = time.perf_counter() - t0
        self._cap = cap
        self._native = native
        info = native.info(cap)
        self.stats = BuildStats(
            precompute_seconds=precompute,
            memory_bytes=int(info["bytes"]),
            trees=int(info["trees"]),
            leaves=int(info["leaves"]),
            table_entries=int(info["table_entries"]),
            direct_leaves=int(info["direct_leaves"]),
            dmax=dmax,
        )

    @property
    def expected_value(self) -> NDArray[np.float64]:
        """Bias per output (margin space)."""
        return np.asarray(self._native.bias(self._cap), dtype=np.float64)

    def contributions(self, x: FloatMatrix) -> Contributions:
        """Attributions in margin space, shape (rows, outputs, features + 1), bias last."""
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"x must have shape (rows, {self.n_features}), got {tuple(x.shape)}")
        xc = np.ascontiguousarray(x, dtype=np.float32)
        out = np.zeros((xc.shape[0], self.n_outputs, self.n_features + 1), dtype=np.float64)
        if xc.shape[0]:
            self._native.shap(self._cap, xc, out)
        return out


class FastPredictor:
    """Raw margins of a forest, bit for bit as its framework adds them. Single-threaded."""

    def __init__(self, forest: Forest) -> None:
        """Lay the trees out; raises UnsupportedModel when the kernel cannot read `forest`."""
        self.n_features = forest.n_features
        self.n_outputs = forest.n_outputs
        self.accumulation = forest.accumulation
        native = _native()
        wide = forest.accumulation is Accumulation.FLOAT64
        try:
            self._cap = native.predictor(*_arrays(forest), wide)
        except ValueError as exc:
            raise UnsupportedModel(str(exc)) from exc
        self._predict = native.predict
        # Numerical thresholds by feature, for probes that hit every boundary.
        feature = np.asarray(forest.feature)
        flags = np.asarray(forest.flags)
        numeric = (np.asarray(forest.left) >= 0) & (flags & NodeFlag.CATEGORICAL == 0)
        threshold = np.asarray(forest.threshold, dtype=np.float64)
        self._splits = {
            int(f): np.unique(threshold[numeric & (feature == f)])
            for f in np.unique(feature[numeric])
        }

    def split_values(self, feature: int) -> NDArray[np.float64]:
        """The distinct numerical thresholds on `feature` (possibly none)."""
        return self._splits.get(feature, np.zeros(0, dtype=np.float64))

    def predict_margins(self, x: FloatMatrix) -> NDArray[np.float64]:
        """Raw margins, shape (rows, outputs).

        Raises TypeError unless `x` is a float32 (rows, features) matrix.
        """
        out = np.empty((len(x), self.n_outputs), dtype=np.float64)
        try:
            self._predict(self._cap, x, out)
        except (TypeError, ValueError, BufferError):
            if x.dtype != np.float32 or x.ndim != 2 or x.flags.c_contiguous:
                raise TypeError(
                    f"x must be float32 (rows, {self.n_features}), got {x.dtype} {x.shape}"
                ) from None
            self._predict(self._cap, np.ascontiguousarray(x), out)
        return out

    def mismatch(self, theirs: NDArray[np.float64], x: FloatMatrix) -> str | None:
        """Where our margins of `x` differ from the framework's (`theirs`) in any bit, or None.

        Bits are compared at the forest's accumulation precision: float32 bits when it adds
        in float32 (a framework returning those sums widened or in float32 alike), float64
        bits otherwise.
        """
        ours = self.predict_margins(x)
        if np.size(theirs) != ours.size:
            return f"the framework returned shape {np.shape(theirs)}, expected {ours.shape}"
        dtype, bits = (
            (np.float32, np.uint32)
            if self.accumulation is Accumulation.FLOAT32
            else (np.float64, np.uint64)
        )
        mine = ours.astype(dtype)
        other = np.asarray(theirs).reshape(ours.shape).astype(dtype)
        differ = mine.view(bits) != other.view(bits)
        if not differ.any():
            return None
        row, col = (int(i) for i in np.argwhere(differ)[0])
        return (
            f"{int(differ.sum())} of {differ.size} margins differ "
            f"(row {row}, output {col}: {mine[row, col]!r} != {other[row, col]!r})"
        )
