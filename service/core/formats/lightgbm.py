"""LightGBM models (the text format of `Booster.save_model`).

The file is read here first, strictly, and only then by lightgbm. Its C++ loader trusts the
file: a tree that is not where `tree_sizes` says, an array shorter than its tree or a file cut
short abort the process (an error thrown inside an OpenMP loop: "terminate called without an
active exception"), and a split on a feature past `max_feature_idx` loads and reads past the
row at prediction. So every line lightgbm reads is checked before it sees the bytes, and the
Forest is built from the same parse.

`Booster.dump_model()` JSON is refused: lightgbm cannot load it, so neither its scores nor
its own TreeSHAP (the references every explanation is checked against) would exist.

Routing as LightGBM's `Tree::Decision` (include/LightGBM/tree.h), on the row as its predictor
builds it: a value within kZeroThreshold (1e-35f) of zero is dropped from the row, which is
zero-filled, so it reads 0.0. Numerical: NaN reads 0.0 unless missing_type is NaN; then a
missing value (NaN under NaN, a zero under Zero) takes the default child, and `x <= threshold`
goes left. Categorical: NaN and negative codes go right, codes in the node's bitset left,
codes past it right; missing_type and default_left play no part. Leaves are doubles (the
learning rate folded in), added in float64 from 0.0 in tree order: the training labels'
average (boost_from_average) is in the first trees' leaves, so the base is 0. TreeSHAP
weighs paths by the training rows that reached each node (`internal_count`, `leaf_count`:
`Tree::TreeSHAP` uses `data_count`, not weights or hessians), so those are the covers.
"""

import math
import re
from dataclasses import dataclass, field
from typing import Any, Final, cast

import lightgbm as lgb
import numpy as np
from lightgbm.basic import LightGBMError
from numpy.typing import NDArray

from service.core.engine.base import Contributions, FloatMatrix
from service.core.formats.base import (
    Accumulation,
    Forest,
    InvalidModel,
    Link,
    ModelDescription,
    NodeFlag,
    UnsupportedModel,
    check_task,
)
from service.core.schema import FeatureType, ModelSchema, Task

NAME = "lightgbm"
SAVE_HINT = "save the booster with Booster.save_model('model.txt')"

# Objectives by the name LightGBM writes (ObjectiveFunction::ToString), with the task they
# serve and the link from margin to prediction (their ConvertOutput).
_OBJECTIVES: Final[dict[str, tuple[Task, Link]]] = {
    "binary": (Task.BINARY, Link.SIGMOID),
    "cross_entropy": (Task.BINARY, Link.SIGMOID),
    "multiclass": (Task.MULTICLASS, Link.SOFTMAX),
    "regression": (Task.REGRESSION, Link.IDENTITY),
    "regression_l1": (Task.REGRESSION, Link.IDENTITY),
    "huber": (Task.REGRESSION, Link.IDENTITY),
    "fair": (Task.REGRESSION, Link.IDENTITY),
    "quantile": (Task.REGRESSION, Link.IDENTITY),
    "mape": (Task.REGRESSION, Link.IDENTITY),
    "poisson": (Task.REGRESSION, Link.EXP),
    "gamma": (Task.REGRESSION, Link.EXP),
    "tweedie": (Task.REGRESSION, Link.EXP),
}
_REFUSED_OBJECTIVES: Final[dict[str, str]] = {
    "multiclassova": (
        "scores each class with its own sigmoid (one-vs-all), which no served link "
        "reproduces: train with objective='multiclass'"
    ),
    "lambdarank": "is a ranking objective: its scores are neither probabilities nor values",
    "rank_xendcg": "is a ranking objective: its scores are neither probabilities nor values",
    "cross_entropy_lambda": "predicts log(1 + exp(margin)), which no served link reproduces",
}
_FORMAT_VERSIONS: Final = frozenset({"v2", "v3", "v4"})

# LightGBM's kZeroThreshold (include/LightGBM/meta.h: `const double kZeroThreshold = 1e-35f`).
ZERO_THRESHOLD: Final = float(np.float32(1e-35))
_BELOW_NEGATIVE_ZERO: Final = math.nextafter(-ZERO_THRESHOLD, -math.inf)
# Category codes at or past this are outside the Forest's sets (base.py, NodeFlag).
_MAX_CATEGORY: Final = 1 << 24
_INT32: Final = (-(2**31), 2**31 - 1)

# Every key LightGBM's Tree reads (src/io/tree.cpp, Tree::Tree(const char*)): 22 at most.
_TREE_KEYS: Final = frozenset(
    {
        "num_leaves",
        "num_cat",
        "split_feature",
        "split_gain",
        "threshold",
        "decision_type",
        "left_child",
        "right_child",
        "leaf_value",
        "leaf_weight",
        "leaf_count",
        "internal_value",
        "internal_weight",
        "internal_count",
        "cat_boundaries",
        "cat_threshold",
        "is_linear",
        "shrinkage",
        "leaf_const",
        "num_features",
        "leaf_features",
        "leaf_coeff",
    }
)
_MAX_TREE_LINES: Final = 22
# Header keys LightGBM allows to hold '=' in their value.
_FREE_TEXT_KEYS: Final = frozenset({"feature_names", "monotone_constraints"})

_LINES = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")
_INT = r"[+-]?\d+"
_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_INTS = re.compile(rf"{_INT}(?: {_INT})*")
_NUMBERS = re.compile(rf"{_NUMBER}(?: {_NUMBER})*")
_THRESHOLD = rf"(?:{_NUMBER}|-?inf)"
_THRESHOLDS = re.compile(rf"{_THRESHOLD}(?: {_THRESHOLD})*")
# Fields LightGBM parses but neither scoring nor TreeSHAP reads may say nan or inf.
_ANY_NUMBER = rf"(?:{_NUMBER}|[+-]?(?:nan|inf|infinity))"
_ANY_NUMBERS = re.compile(rf"{_ANY_NUMBER}(?: {_ANY_NUMBER})*", re.IGNORECASE)
_TEXT_HEAD = re.compile(rb"tree\r?(?:\n|\Z)")
_DUMP_NAME = re.compile(rb'"name"\s*:\s*"tree"')
_DUMP_VERSION = re.compile(rb'"version"\s*:\s*"v\d+"')
_PARAMETER = re.compile(r"\[([A-Za-z0-9_]+): ?(.*)\]")


def _corrupt(detail: str) -> InvalidModel:
    return InvalidModel(f"is a corrupt LightGBM model: {detail}")


def _truncated(detail: str) -> InvalidModel:
    return InvalidModel(f"is a truncated LightGBM model: {detail}")


# --- the text -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Line:
    start: int  # byte offset of the line in the file
    text: bytes  # without its line break


@dataclass(frozen=True)
class _Tree:
    """One tree's arrays, checked: a rooted binary tree over the model's features."""

    num_leaves: int
    num_cat: int
    split_feature: NDArray[np.int32]
    threshold: NDArray[np.float64]
    decision_type: NDArray[np.int32]
    left_child: NDArray[np.int32]
    right_child: NDArray[np.int32]
    leaf_value: NDArray[np.float64]
    leaf_count: NDArray[np.float64]
    internal_count: NDArray[np.float64]
    cat_boundaries: NDArray[np.int64]
    cat_threshold: NDArray[np.uint32]


@dataclass(frozen=True)
class _Objective:
    name: str
    task: Task
    link: Link
    sigmoid: float = 1.0


@dataclass(frozen=True)
class _TextModel:
    """What the file says, every part lightgbm reads checked."""

    format_version: str
    num_class: int
    tree_per_iteration: int
    feature_names: tuple[str, ...]
    feature_infos: tuple[str, ...]
    objective: _Objective
    average_output: bool
    trees: tuple[_Tree, ...]
    parameters: dict[str, str]
    # Features split as categories, and as numbers, by some tree.
    split_categorical: frozenset[int] = field(default_factory=frozenset)
    split_numerical: frozenset[int] = field(default_factory=frozenset)


def _lines(data: bytes) -> list[_Line]:
    """Lines as LightGBM cuts them (Common::GetLine, SkipNewLine: \\n, \\r or \\r\\n)."""
    found = []
    for match in _LINES.finditer(data):
        line = match.group()
        if not line:
            continue
        found.append(_Line(match.start(), line.rstrip(b"\r\n")))
    return found


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _corrupt(f"{where} is not UTF-8 text") from None


def _int(value: str, what: str, low: int = _INT32[0], high: int = _INT32[1]) -> int:
    if not re.fullmatch(_INT, value):
        raise _corrupt(f"{what} is {value[:40]!r}, not an integer")
    number = int(value)
    if not low <= number <= high:
        raise _corrupt(f"{what} is {number}, outside {low}..{high}")
    return number


def _int_array(value: str, n: int, what: str, low: int, high: int) -> NDArray[np.int64]:
    if n == 0 and value == "":
        return np.zeros(0, dtype=np.int64)
    if not _INTS.fullmatch(value):
        raise _corrupt(f"{what} is not a list of integers")
    parts = value.split(" ")
    if len(parts) != n:
        raise _corrupt(f"{what} has {len(parts)} values, not {n}")
    # Python ints first: a 30-digit value must be refused, not wrapped around.
    numbers = [int(p) for p in parts]
    if min(numbers) < low or max(numbers) > high:
        raise _corrupt(f"{what} holds a value outside {low}..{high}")
    return np.array(numbers, dtype=np.int64)


def _float_array(value: str, n: int, what: str, *, infinite: bool = False) -> NDArray[np.float64]:
    """Doubles, parsed as LightGBM's AtofPrecise does (correctly rounded); finite, but for
    `infinite` fields the words inf and -inf (a split of NaN from every number)."""
    pattern = _THRESHOLDS if infinite else _NUMBERS
    if not pattern.fullmatch(value):
        raise _corrupt(f"{what} is not a list of {'' if infinite else 'finite '}numbers")
    parts = value.split(" ")
    if len(parts) != n:
        raise _corrupt(f"{what} has {len(parts)} values, not {n}")
    numbers = np.array([float(p) for p in parts], dtype=np.float64)
    numerals = np.array([p.lstrip("-") != "inf" for p in parts])
    if not np.isfinite(numbers[numerals]).all():
        raise _corrupt(f"{what} holds a number too large for a double")
    return numbers


def _check_unused_numbers(value: str, n: int, what: str) -> None:
    if not _ANY_NUMBERS.fullmatch(value) or len(value.split(" ")) != n:
        raise _corrupt(f"{what} is not a list of {n} numbers")


def _header(lines: list[_Line]) -> tuple[dict[str, str], int]:
    """The key=value lines before the first tree, and the index of the first tree's line."""
    if not lines or lines[0].text != b"tree":
        raise _corrupt("its first line is not 'tree'")
    header: dict[str, str] = {}
    for index, line in enumerate(lines[1:], start=1):
        if line.text.startswith(b"Tree="):
            return header, index
        if not line.text:
            continue
        text = _decode(line.text, f"line {index + 1}")
        key, equals, value = text.partition("=")
        if equals and "=" in value and key not in _FREE_TEXT_KEYS:
            raise _corrupt(f"line {index + 1} holds more than one '='")
        if key in header:
            raise _corrupt(f"its header names {key!r} twice")
        header[key] = value
    raise _truncated("it has no trees (no 'Tree=' line)")


def _tree_blocks(lines: list[_Line], first: int) -> tuple[list[dict[str, str]], list[int], int]:
    """Each tree's key=value lines, the byte offset of each tree, and of 'end of trees'."""
    if not any(line.text == b"end of trees" for line in lines[first:]):
        last = sum(line.text.startswith(b"Tree=") for line in lines[first:]) - 1
        raise _truncated(f"it ends inside tree {last}, before 'end of trees'")
    blocks: list[dict[str, str]] = []
    starts: list[int] = []
    index = first
    while True:
        while index < len(lines) and not lines[index].text:
            index += 1
        if index == len(lines):
            raise _truncated(f"it ends after {len(blocks)} trees, without 'end of trees'")
        line = lines[index]
        if line.text == b"end of trees":
            return blocks, starts, line.start
        if line.text != b"Tree=%d" % len(blocks):
            shown = line.text[:40].decode("utf-8", "replace")
            raise _corrupt(f"expected 'Tree={len(blocks)}' or 'end of trees', found {shown!r}")
        starts.append(line.start)
        block: dict[str, str] = {}
        index += 1
        while index < len(lines) and lines[index].text:
            where = f"tree {len(blocks)}"
            key, equals, value = _decode(lines[index].text, where).partition("=")
            if not equals or key not in _TREE_KEYS:
                raise _corrupt(f"{where} has an unknown line {key[:40]!r}")
            if key in block:
                raise _corrupt(f"{where} names {key!r} twice")
            block[key] = value
            index += 1
        if len(block) > _MAX_TREE_LINES:
            raise _corrupt(f"tree {len(blocks)} has more than {_MAX_TREE_LINES} lines")
        if index == len(lines):
            raise _truncated(f"it ends inside tree {len(blocks)}")
        blocks.append(block)


def _parameters(lines: list[_Line]) -> dict[str, str]:
    """The training parameters: the "[key: value]" lines from "parameters:" to "end of
    parameters". lightgbm splits each at ':' and indexes the second part unchecked
    (GBDT::GetLoadedParam): a line without one crashes the process."""
    texts = [line.text for line in lines]
    if b"parameters:" not in texts:
        return {}
    first = texts.index(b"parameters:") + 1
    if b"end of parameters" not in texts[first:]:
        raise _truncated("its parameters do not end ('end of parameters' is missing)")
    parameters: dict[str, str] = {}
    for raw in texts[first : texts.index(b"end of parameters", first)]:
        if not raw:
            continue
        match = _PARAMETER.fullmatch(_decode(raw, "a parameter line"))
        if match is None:
            shown = raw[:40].decode("utf-8", "replace")
            raise _corrupt(f"its parameter line {shown!r} is not '[name: value]'")
        parameters[match.group(1)] = match.group(2)
    return parameters


def _pandas_categorical(stored: Any) -> list[list[str | int | float]] | None:
    """The category lists lightgbm read from the file's last line, if well-formed."""
    if stored is None:
        return None
    if not isinstance(stored, list) or not all(
        isinstance(labels, list)
        and all(isinstance(v, str | int | float) and not isinstance(v, bool) for v in labels)
        for labels in stored
    ):
        raise _corrupt("its pandas_categorical line is not a list of category lists")
    return stored


def _objective(text: str | None, num_class: int) -> _Objective:
    if text is None:
        raise InvalidModel(
            "was trained with a custom objective (no objective= line): its margins have no "
            "known link to a prediction"
        )
    name, *tokens = text.split(" ")
    if name in _REFUSED_OBJECTIVES:
        raise InvalidModel(f"has objective {name!r}, which {_REFUSED_OBJECTIVES[name]}")
    if name not in _OBJECTIVES:
        supported = ", ".join(sorted(_OBJECTIVES))
        raise InvalidModel(f"has objective {name!r}, which is not supported ({supported})")
    if "sqrt" in tokens:
        raise InvalidModel(
            f"has objective {name!r} with reg_sqrt (predictions are the squared margin), "
            "which no served link reproduces"
        )
    options = dict(token.partition(":")[::2] for token in tokens if ":" in token)
    task, link = _OBJECTIVES[name]
    if task is Task.MULTICLASS and options.get("num_class") != str(num_class):
        raise _corrupt(f"objective {text!r} disagrees with num_class={num_class}")
    if task is not Task.MULTICLASS and num_class != 1:
        raise _corrupt(f"objective {name!r} with num_class={num_class}")
    sigmoid = 1.0
    if name == "binary":
        raw = options.get("sigmoid", "")
        if not re.fullmatch(_NUMBER, raw) or not 0.0 < float(raw) < math.inf:
            raise _corrupt(f"objective {text!r} has no positive sigmoid")
        sigmoid = float(raw)
    return _Objective(name, task, link, sigmoid)


def _tree(block: dict[str, str], where: str, n_features: int) -> _Tree:
    if "num_leaves" not in block or "leaf_value" not in block or "num_cat" not in block:
        raise _corrupt(f"{where} lacks num_leaves, num_cat or leaf_value")
    n = _int(block["num_leaves"], f"num_leaves of {where}", 1)
    num_cat = _int(block["num_cat"], f"num_cat of {where}", 0)
    if block.get("is_linear", "0") != "0":
        raise InvalidModel(
            "has linear trees (linear_tree=true), which neither LightGBM's pred_contrib nor "
            "the native engines explain"
        )
    if "shrinkage" in block:
        _float_array(block["shrinkage"], 1, f"shrinkage of {where}")
    leaf_value = _float_array(block["leaf_value"], n, f"leaf_value of {where}")
    if n == 1:  # LightGBM reads nothing else of a one-leaf tree.
        return _Tree(
            num_leaves=1,
            num_cat=0,
            split_feature=np.zeros(0, dtype=np.int32),
            threshold=np.zeros(0),
            decision_type=np.zeros(0, dtype=np.int32),
            left_child=np.zeros(0, dtype=np.int32),
            right_child=np.zeros(0, dtype=np.int32),
            leaf_value=leaf_value,
            # No split divides by it: any positive cover will do.
            leaf_count=np.ones(1),
            internal_count=np.zeros(0),
            cat_boundaries=np.zeros(1, dtype=np.int64),
            cat_threshold=np.zeros(0, dtype=np.uint32),
        )
    required = ("split_feature", "threshold", "decision_type", "left_child", "right_child")
    missing = [key for key in (*required, "leaf_count", "internal_count") if key not in block]
    if missing:
        # Without the counts LightGBM's TreeSHAP divides by zero (NaN attributions).
        raise _corrupt(f"{where} lacks {', '.join(missing)}")
    for key, size in (("split_gain", n - 1), ("internal_value", n - 1)):
        if key in block:
            _check_unused_numbers(block[key], size, f"{key} of {where}")
    for key, size in (("internal_weight", n - 1), ("leaf_weight", n)):
        if key in block:
            _check_unused_numbers(block[key], size, f"{key} of {where}")
    split_feature = _int_array(
        block["split_feature"], n - 1, f"split_feature of {where}", 0, n_features - 1
    )
    decision_type = _int_array(block["decision_type"], n - 1, f"decision_type of {where}", 0, 15)
    if (((decision_type >> 2) & 3) == 3).any():
        raise _corrupt(f"decision_type of {where} names an unknown missing type")
    left = _int_array(block["left_child"], n - 1, f"left_child of {where}", -n, n - 2)
    right = _int_array(block["right_child"], n - 1, f"right_child of {where}", -n, n - 2)
    _check_shape(left, right, where)
    threshold = _float_array(block["threshold"], n - 1, f"threshold of {where}", infinite=True)
    leaf_count = _int_array(block["leaf_count"], n, f"leaf_count of {where}", 0, _INT32[1])
    internal_count = _int_array(
        block["internal_count"], n - 1, f"internal_count of {where}", 1, _INT32[1]
    )
    boundaries, bits = _category_sets(block, num_cat, where)
    categorical = (decision_type & 1) != 0
    if categorical.any():
        cat_index = threshold[categorical]
        if (
            not (np.floor(cat_index) == cat_index).all()
            or not ((cat_index >= 0) & (cat_index < num_cat)).all()
        ):
            raise _corrupt(f"a categorical split of {where} names a category set it lacks")
    return _Tree(
        num_leaves=n,
        num_cat=num_cat,
        split_feature=split_feature.astype(np.int32),
        threshold=threshold,
        decision_type=decision_type.astype(np.int32),
        left_child=left.astype(np.int32),
        right_child=right.astype(np.int32),
        leaf_value=leaf_value,
        leaf_count=leaf_count.astype(np.float64),
        internal_count=internal_count.astype(np.float64),
        cat_boundaries=boundaries,
        cat_threshold=bits,
    )


def _check_shape(left: NDArray[np.int64], right: NDArray[np.int64], where: str) -> None:
    """Every internal node but the root and every leaf is one node's child, and all hang
    from the root: LightGBM walks it without bounds checks (no cycle, no node twice)."""
    n = len(left) + 1
    children = np.concatenate([left, right])
    internal = np.sort(children[children >= 0])
    leaves = np.sort(~children[children < 0])
    if not np.array_equal(internal, np.arange(1, n - 1)) or not np.array_equal(
        leaves, np.arange(n)
    ):
        raise _corrupt(f"the children of {where} do not form a tree")
    seen, stack = 0, [0]
    while stack:
        node = stack.pop()
        seen += 1
        stack.extend(int(c) for c in (left[node], right[node]) if c >= 0)
        if seen > n - 1:
            break
    if seen != n - 1:
        raise _corrupt(f"the children of {where} do not form a tree")


def _category_sets(
    block: dict[str, str], num_cat: int, where: str
) -> tuple[NDArray[np.int64], NDArray[np.uint32]]:
    if num_cat == 0:
        return np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.uint32)
    if "cat_boundaries" not in block or "cat_threshold" not in block:
        raise _corrupt(f"{where} lacks cat_boundaries or cat_threshold")
    boundaries = _int_array(
        block["cat_boundaries"], num_cat + 1, f"cat_boundaries of {where}", 0, _INT32[1]
    )
    if boundaries[0] != 0 or (np.diff(boundaries) < 0).any():
        raise _corrupt(f"cat_boundaries of {where} do not cut cat_threshold")
    bits = _int_array(
        block["cat_threshold"], int(boundaries[-1]), f"cat_threshold of {where}", 0, 2**32 - 1
    )
    return boundaries, bits.astype(np.uint32)


def _parse(data: bytes) -> _TextModel:
    if b"\x00" in data:
        raise _corrupt("it holds a NUL byte (a text model has none)")
    lines = _lines(data)
    header, first = _header(lines)
    for key in ("version", "num_class", "max_feature_idx", "feature_names", "feature_infos"):
        if key not in header:
            raise _corrupt(f"its header lacks {key}=")
    if header["version"] not in _FORMAT_VERSIONS:
        raise InvalidModel(f"is a LightGBM model of unknown format version {header['version']!r}")
    num_class = _int(header["num_class"], "num_class", 1)
    per_iteration = _int(
        header.get("num_tree_per_iteration", str(num_class)), "num_tree_per_iteration", 1
    )
    if per_iteration != num_class:
        raise _corrupt(f"num_tree_per_iteration={per_iteration} with num_class={num_class}")
    _int(header.get("label_index", "0"), "label_index")
    n_features = _int(header["max_feature_idx"], "max_feature_idx", 0) + 1
    names = tuple(header["feature_names"].split(" "))
    infos = tuple(header["feature_infos"].split(" "))
    if len(names) != n_features or not all(names) or len(set(names)) != n_features:
        raise _corrupt(f"feature_names does not name {n_features} distinct features")
    if len(infos) != n_features:
        raise _corrupt(f"feature_infos does not describe {n_features} features")
    if "monotone_constraints" in header:
        _int_array(header["monotone_constraints"], n_features, "monotone_constraints", -1, 1)
    objective = _objective(header.get("objective"), num_class)
    blocks, starts, end = _tree_blocks(lines, first)
    if not blocks or len(blocks) % per_iteration:
        raise _corrupt(f"{len(blocks)} trees are not whole iterations of {per_iteration}")
    if "tree_sizes" in header:
        # LightGBM seeks to each tree by these sizes; off by one byte it aborts the process.
        sizes = _int_array(header["tree_sizes"], len(blocks), "tree_sizes", 0, len(data))
        if not np.array_equal(sizes, np.diff([*starts, end])):
            raise _corrupt("tree_sizes do not match the trees (was the file edited?)")
    trees = tuple(_tree(b, f"tree {i}", n_features) for i, b in enumerate(blocks))
    parameters = _parameters(lines[first:])
    if parameters.get("linear_tree", "0") not in ("0", "false"):
        raise InvalidModel(
            "has linear trees (linear_tree=true), which neither LightGBM's pred_contrib nor "
            "the native engines explain"
        )
    split_categorical: set[int] = set()
    split_numerical: set[int] = set()
    for tree in trees:
        categorical = (tree.decision_type & 1) != 0
        split_categorical.update(tree.split_feature[categorical].tolist())
        split_numerical.update(tree.split_feature[~categorical].tolist())
    both = split_categorical & split_numerical
    if both:
        raise _corrupt(f"feature {names[min(both)]!r} is split both as categories and as numbers")
    return _TextModel(
        format_version=header["version"],
        num_class=num_class,
        tree_per_iteration=per_iteration,
        feature_names=names,
        feature_infos=infos,
        objective=objective,
        average_output="average_output" in header,
        trees=trees,
        parameters=parameters,
        split_categorical=frozenset(split_categorical),
        split_numerical=frozenset(split_numerical),
    )


# --- the Forest -----------------------------------------------------------------------------


def _thresholds(threshold: NDArray[np.float64]) -> NDArray[np.float64]:
    """Thresholds for `x <= t` on the raw value, deciding as LightGBM's on the value it reads.

    LightGBM reads |x| <= kZeroThreshold as 0.0, so for x in that band it decides `0 <= t`.
    Only a threshold inside the band can tell the band's values apart; moved to its edge,
    the band goes one way, as 0.0 does, and every value outside it is decided as before.
    """
    moved = np.where(
        (threshold >= -ZERO_THRESHOLD) & (threshold < 0.0), _BELOW_NEGATIVE_ZERO, threshold
    )
    return np.where((moved >= 0.0) & (moved < ZERO_THRESHOLD), ZERO_THRESHOLD, moved)


def _node_flags(decision_type: NDArray[np.int32]) -> NDArray[np.uint8]:
    """NodeFlag per internal node from LightGBM's decision_type bits (tree.h: bit 0
    categorical, bit 1 default left, bits 2-3 missing type None/Zero/NaN)."""
    default_left = np.where((decision_type & 2) != 0, int(NodeFlag.DEFAULT_LEFT), 0)
    missing = (decision_type >> 2) & 3
    less_equal, nan_as_zero = int(NodeFlag.LESS_EQUAL), int(NodeFlag.NAN_AS_ZERO)
    numerical = np.select(
        [missing == 0, missing == 1],
        [
            np.full_like(default_left, less_equal | nan_as_zero),
            less_equal | nan_as_zero | int(NodeFlag.ZERO_MISSING) | default_left,
        ],
        less_equal | default_left,
    )
    categorical = int(NodeFlag.CATEGORICAL | NodeFlag.CAT_IN_SET_LEFT)
    return np.where((decision_type & 1) != 0, categorical, numerical).astype(np.uint8)


def _forest(model: _TextModel, n_features: int, divisor: float) -> Forest:
    sizes = [2 * tree.num_leaves - 1 for tree in model.trees]
    tree_ptr = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=tree_ptr[1:])
    total = int(tree_ptr[-1])
    left = np.full(total, -1, dtype=np.int32)
    right = np.full(total, -1, dtype=np.int32)
    feature = np.zeros(total, dtype=np.int32)
    threshold = np.zeros(total)
    flags = np.zeros(total, dtype=np.uint8)
    value = np.zeros(total)
    cover = np.zeros(total)
    cat_counts = np.zeros(total, dtype=np.int64)
    cat_words: list[NDArray[np.uint32]] = []
    for t, tree in enumerate(model.trees):
        start, inner = int(tree_ptr[t]), tree.num_leaves - 1
        internal = slice(start, start + inner)
        leaves = slice(start + inner, start + 2 * inner + 1)
        # Internal nodes first (the root is node 0), then leaf k at inner + k.
        left[internal] = np.where(tree.left_child >= 0, tree.left_child, inner + ~tree.left_child)
        right[internal] = np.where(
            tree.right_child >= 0, tree.right_child, inner + ~tree.right_child
        )
        feature[internal] = tree.split_feature
        categorical = (tree.decision_type & 1) != 0
        threshold[internal] = np.where(categorical, 0.0, _thresholds(tree.threshold))
        flags[internal] = _node_flags(tree.decision_type)
        cover[internal] = tree.internal_count
        value[leaves] = tree.leaf_value
        cover[leaves] = tree.leaf_count
        for node in np.flatnonzero(categorical):
            cat = int(tree.threshold[node])
            words = tree.cat_threshold[tree.cat_boundaries[cat] : tree.cat_boundaries[cat + 1]]
            if len(words) * 32 > _MAX_CATEGORY and words[_MAX_CATEGORY // 32 :].any():
                raise UnsupportedModel("a category set holds codes past 2**24")
            words = words[: _MAX_CATEGORY // 32]
            cat_counts[start + node] = len(words)
            cat_words.append(words)
    cat_ptr = np.zeros(total + 1, dtype=np.int64)
    np.cumsum(cat_counts, out=cat_ptr[1:])
    n_trees = len(model.trees)
    return Forest(
        n_features=n_features,
        n_outputs=model.tree_per_iteration,
        tree_ptr=tree_ptr,
        tree_output=(np.arange(n_trees) % model.tree_per_iteration).astype(np.int32),
        left=left,
        right=right,
        feature=feature,
        threshold=threshold,
        flags=flags,
        cat_ptr=cat_ptr,
        cat_words=np.concatenate(cat_words) if cat_words else np.zeros(0, dtype=np.uint32),
        value=value,
        cover=cover,
        base=np.zeros(model.tree_per_iteration),
        accumulation=Accumulation.FLOAT64,
        divisor=divisor,
    )


# --- the model ------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _predict(booster: lgb.Booster, x: FloatMatrix, **kind: bool) -> NDArray[np.float64]:
    """LightGBM's prediction on the float32 rows widened to float64, one thread."""
    try:
        values = booster.predict(
            np.asarray(x, dtype=np.float64), num_iteration=-1, num_threads=1, **kind
        )
    except LightGBMError as exc:
        raise InvalidModel(f"lightgbm cannot score with it: {_first_line(exc)}") from None
    return np.asarray(cast(NDArray[np.float64], values), dtype=np.float64)


class PredContrib:
    """LightGBM's own exact TreeSHAP (``predict(..., pred_contrib=True)``), one thread: the
    correctness reference for every engine on LightGBM models."""

    name = "pred_contrib"

    def __init__(self, booster: lgb.Booster, n_outputs: int, divisor: float) -> None:
        self._booster = booster
        self._outputs = n_outputs
        self._divisor = divisor

    def contributions(self, x: FloatMatrix) -> Contributions:
        """Attributions, shape (rows, outputs, features + 1), bias last, in margin space."""
        rows, width = x.shape[0], x.shape[1] + 1
        if rows == 0:
            return np.zeros((0, self._outputs, width))
        values = _predict(self._booster, x, pred_contrib=True).reshape(rows, self._outputs, width)
        return values / self._divisor if self._divisor != 1.0 else values


class LightgbmModel:
    """A LightGBM booster loaded from its text model (the `FormatModel` of LightGBM files)."""

    format = NAME

    def __init__(self, booster: lgb.Booster, text: _TextModel) -> None:
        self.booster = booster
        self._text = text
        self._pandas_categorical = _pandas_categorical(booster.pandas_categorical)
        # The installed lightgbm's: a text model records only its format ("v4").
        self.framework_version: str = lgb.__version__
        self.format_version = text.format_version
        self.n_features = len(text.feature_names)
        self.n_outputs = text.tree_per_iteration
        self.n_classes = text.num_class if text.objective.task is Task.MULTICLASS else 0
        self.objective: str = text.objective.name
        self.task: Task = text.objective.task
        self.link: Link = text.objective.link
        # LightGBM's prediction is link(sigmoid * raw / iterations) (random forests average
        # their trees, binary models may scale by `sigmoid`): the margin is what the link reads.
        self._iterations = len(text.trees) // text.tree_per_iteration
        self._average = text.average_output
        self._sigmoid = text.objective.sigmoid
        self._divisor = (self._iterations if self._average else 1) / self._sigmoid
        self._categorical = self._categorical_features()
        self._stored = self._stored_categories()

    def _categorical_features(self) -> frozenset[int]:
        """Features LightGBM treats as categories: split so, or binned so (feature_infos
        lists a categorical feature's codes, "v:v:v", a numerical one's range, "[a:b]")."""
        binned = {
            i
            for i, info in enumerate(self._text.feature_infos)
            if info != "none" and not info.startswith("[")
        }
        numerical = {i for i, info in enumerate(self._text.feature_infos) if info.startswith("[")}
        if binned & self._text.split_numerical or numerical & self._text.split_categorical:
            raise _corrupt("its feature_infos disagree with its splits")
        return frozenset(binned | self._text.split_categorical)

    def _numerical_features(self) -> frozenset[int]:
        infos = self._text.feature_infos
        return frozenset(i for i, info in enumerate(infos) if info.startswith("[")).union(
            self._text.split_numerical
        )

    def _seen_codes(self, index: int) -> int:
        """The largest category code of this feature in the training data (-1: none)."""
        info = self._text.feature_infos[index]
        codes = [int(v) for v in info.split(":") if re.fullmatch(_INT, v)]
        return max(codes, default=-1)

    def _stored_categories(self) -> dict[int, tuple[str, ...]]:
        """The pandas categories the model stored, by feature index.

        LightGBM stores one list per pandas category column, in column order; unordered
        ones are its categorical features. When the lists and the categorical features do
        not pair up one to one (categories also declared for integer columns, ordered
        categories), which list is whose is unknown: none is attributed.
        """
        stored = self._pandas_categorical
        features = sorted(self._categorical)
        if not stored or len(stored) != len(features):
            return {}
        found = {
            i: tuple(_label(v) for v in labels) for i, labels in zip(features, stored, strict=True)
        }
        if any(self._seen_codes(i) >= len(labels) for i, labels in found.items()):
            return {}
        return found

    def check_schema(self, schema: ModelSchema) -> None:
        """Raise InvalidModel naming how `schema` does not describe this model."""
        names = self._text.feature_names
        if len(schema.features) != self.n_features:
            raise InvalidModel(
                f"the model has {self.n_features} features, the schema {len(schema.features)}"
            )
        if not _default_names(names) and tuple(schema.feature_names) != names:
            raise InvalidModel("feature names or order differ from the model's")
        numerical = self._numerical_features()
        for index, feature in enumerate(schema.features):
            categorical = feature.type is FeatureType.CATEGORICAL
            if categorical and index in numerical:
                raise InvalidModel(f"{feature.name!r} is numerical in the model")
            if not categorical and index in self._categorical:
                raise InvalidModel(f"{feature.name!r} is categorical in the model")
            if not categorical:
                continue
            stored = self._stored.get(index)
            if stored is not None and stored != feature.categories:
                raise InvalidModel(
                    f"categories of {feature.name!r} differ from the ones the model was "
                    "trained with (order matters: a position is a code)"
                )
            seen = self._seen_codes(index)
            if seen >= len(feature.categories):
                raise InvalidModel(
                    f"{feature.name!r}: the model was trained on category code {seen}, the "
                    f"schema names {len(feature.categories)} categories"
                )
        check_task(schema, self.task, self.objective, self.n_classes)

    def forest(self) -> Forest:
        """The trees in the native engines' layout; raises UnsupportedModel."""
        # x / (1 / s) is x * s, bit for bit, only for a power of two.
        if math.frexp(self._sigmoid)[0] != 0.5:
            raise UnsupportedModel(
                f"sigmoid {self._sigmoid:g} is not a power of two: the native engines cannot "
                "repeat LightGBM's scaled margins bit for bit"
            )
        return _forest(self._text, self.n_features, self._divisor)

    def predict_margins(self, x: FloatMatrix) -> NDArray[np.float64]:
        """LightGBM's raw scores (averaged and scaled as its prediction is), (rows, outputs)."""
        if x.shape[0] == 0:
            return np.zeros((0, self.n_outputs))
        margins = _predict(self.booster, x, raw_score=True).reshape(x.shape[0], self.n_outputs)
        # As GBDT::Predict and BinaryLogloss::ConvertOutput compute them, operation for operation.
        if self._average:
            margins = margins / self._iterations
        if self._sigmoid != 1.0:
            margins = margins * self._sigmoid
        return margins

    def reference_engine(self) -> PredContrib:
        """LightGBM's own TreeSHAP."""
        return PredContrib(self.booster, self.n_outputs, self._divisor)

    def describe(self) -> ModelDescription:
        """What `model init` needs to write a schema."""
        names = self._text.feature_names
        return ModelDescription(
            task=self.task,
            feature_names=None if _default_names(names) else names,
            categorical={names[i]: self._stored.get(i, ()) for i in sorted(self._categorical)},
            n_classes=self.n_classes,
        )


def _default_names(names: tuple[str, ...]) -> bool:
    """LightGBM's names for a model trained without any (from a numpy array)."""
    return names == tuple(f"Column_{i}" for i in range(len(names)))


def _label(value: str | int | float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


class LightgbmFormat:
    """LightGBM's text model files (the `ModelFormat`)."""

    name = NAME

    def recognises(self, data: bytes) -> bool:
        """A text model (its first line is "tree") or a `dump_model()` JSON document."""
        if _TEXT_HEAD.match(data):
            return True
        head = data[:4096]
        # XGBoost's JSON has neither: its version is an array, its booster "gbtree".
        return (
            head.lstrip()[:1] == b"{"
            and _DUMP_NAME.search(head) is not None
            and _DUMP_VERSION.search(head) is not None
        )

    def load(self, data: bytes) -> LightgbmModel:
        """The model; raises InvalidModel with one line naming what is wrong."""
        if not _TEXT_HEAD.match(data):
            if self.recognises(data):
                raise InvalidModel(
                    "is a LightGBM JSON dump (Booster.dump_model), which LightGBM cannot load "
                    f"back: {SAVE_HINT}"
                )
            raise InvalidModel("is not a LightGBM text model (its first line is not 'tree')")
        # Checked before lightgbm reads it: its loader aborts the process on malformed files.
        text = _parse(data)
        try:
            booster = lgb.Booster(model_str=data.decode("utf-8"))
        except UnicodeDecodeError:
            raise _corrupt("it is not UTF-8 text") from None
        except LightGBMError as exc:
            raise InvalidModel(f"cannot be loaded by lightgbm: {_first_line(exc)}") from None
        except ValueError as exc:  # json.loads of its parameters or pandas_categorical
            raise _corrupt(
                f"lightgbm cannot read its parameters or pandas_categorical: {_first_line(exc)}"
            ) from None
        if (
            booster.num_trees() != len(text.trees)
            or booster.num_feature() != len(text.feature_names)
            or booster.num_model_per_iteration() != text.tree_per_iteration
        ):
            raise _corrupt("lightgbm reads other trees or features from it than it holds")
        return LightgbmModel(booster, text)


FORMAT = LightgbmFormat()
