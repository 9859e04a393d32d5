"""An independent float64 reading of a `Forest`: routing, margins and brute-force TreeSHAP.

Written from the Forest's documented semantics (service/core/formats/base.py), with none of the
native kernel's code: the tests use it to check a format's conversion (its margins equal the
framework's) and the kernel (its attributions equal these), on models small enough to
enumerate every feature subset.
"""

import math
from itertools import combinations

import numpy as np
from numpy.typing import NDArray

from service.core.formats.base import Accumulation, Forest, NodeFlag

# LightGBM's kZeroThreshold, a float: 1e-35f.
ZERO = float(np.float32(1e-35))
MAX_CODE = 1 << 24


def goes_left(forest: Forest, node: int, x: float) -> bool:
    """Whether value `x` (float32, widened) goes to the left child of global node `node`."""
    flags = NodeFlag(int(forest.flags[node]))
    if math.isnan(x) and NodeFlag.NAN_AS_ZERO in flags:
        x = 0.0
    if math.isnan(x) or (NodeFlag.ZERO_MISSING in flags and abs(x) <= ZERO):
        return NodeFlag.DEFAULT_LEFT in flags
    if NodeFlag.CATEGORICAL not in flags:
        if NodeFlag.LESS_EQUAL in flags:
            return bool(x <= forest.threshold[node])
        return bool(x < forest.threshold[node])
    other = NodeFlag.CAT_OTHER_LEFT in flags
    if x < 0 or x >= MAX_CODE:
        return other
    code = int(x)
    words = forest.cat_words[forest.cat_ptr[node] : forest.cat_ptr[node + 1]]
    if code // 32 >= len(words):
        return other
    in_set = bool((int(words[code // 32]) >> (code % 32)) & 1)
    return in_set == (NodeFlag.CAT_IN_SET_LEFT in flags)


def leaf_of(forest: Forest, tree: int, row: NDArray[np.float32]) -> int:
    """The global index of the leaf `row` reaches in `tree`."""
    start = int(forest.tree_ptr[tree])
    node = start
    while forest.left[node] >= 0:
        left = goes_left(forest, node, float(row[forest.feature[node]]))
        node = start + int(forest.left[node] if left else forest.right[node])
    return node


def margins(forest: Forest, x: NDArray[np.float32]) -> NDArray[np.float64]:
    """Raw margins, shape (rows, outputs), summed as the forest's accumulation says."""
    out = np.zeros((len(x), forest.n_outputs))
    float32 = forest.accumulation is Accumulation.FLOAT32
    for r, row in enumerate(x):
        acc = [np.float32(b) if float32 else float(b) for b in forest.base]
        for t in range(forest.n_trees):
            value = forest.value[leaf_of(forest, t, row)]
            g = int(forest.tree_output[t])
            acc[g] = np.float32(acc[g] + np.float32(value)) if float32 else acc[g] + value
        out[r] = [float(a) / forest.divisor for a in acc]
    return out


def _expect(
    forest: Forest, start: int, node: int, row: NDArray[np.float32], known: set[int]
) -> float:
    """The tree's expected output given the features in `known` (path-dependent)."""
    left = int(forest.left[node])
    if left < 0:
        return float(forest.value[node])
    lo, hi = start + left, start + int(forest.right[node])
    feature = int(forest.feature[node])
    if feature in known:
        follow = lo if goes_left(forest, node, float(row[feature])) else hi
        return _expect(forest, start, follow, row, known)
    cover = [float(forest.cover[i]) for i in (node, lo, hi)]
    if cover[0] == 0:
        return 0.0
    below = cover[1] * _expect(forest, start, lo, row, known)
    return (below + cover[2] * _expect(forest, start, hi, row, known)) / cover[0]


def shap(forest: Forest, x: NDArray[np.float32]) -> NDArray[np.float64]:
    """Path-dependent TreeSHAP by enumerating every subset: (rows, outputs, features + 1),
    bias last, in the margin space (base and divisor applied). For a handful of features."""
    n = forest.n_features
    out = np.zeros((len(x), forest.n_outputs, n + 1))
    for r, row in enumerate(x):
        for g in range(forest.n_outputs):
            out[r, g, n] = forest.base[g] / forest.divisor
        for t in range(forest.n_trees):
            start, g = int(forest.tree_ptr[t]), int(forest.tree_output[t])

            def value(known: set[int], start: int = start, row: NDArray[np.float32] = row) -> float:
                return _expect(forest, start, start, row, known) / forest.divisor

            out[r, g, n] += value(set())
            for i in range(n):
                others = [j for j in range(n) if j != i]
                for k in range(n):
                    weight = math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
                    for subset in combinations(others, k):
                        known = set(subset)
                        out[r, g, i] += weight * (value(known | {i}) - value(known))
    return out
