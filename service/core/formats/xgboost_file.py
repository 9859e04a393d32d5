"""What a model file holds, checked in Python before xgboost parses it.

xgboost's C++ loader trusts its input: an empty buffer aborts the process (SIGABRT), a
malformed UBJSON length or a category segment past its array's end crashes it (SIGSEGV), and
a child index out of range loads and crashes later, at prediction. One bad file must cost a
sentence naming it, not the process, so every model file is checked here first: its format
(JSON or UBJSON, fully parsed: a truncated file is caught), and the document's shape (the
learner, the booster, and in every tree the arrays xgboost indexes, their lengths and
ranges). What is checked is what xgboost would crash on or silently misread, not what it
refuses cleanly with an error of its own.
"""

import itertools
import json
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import orjson
from numpy.typing import NDArray

_F32_MAX: Final = float(np.finfo(np.float32).max)
# xgboost's largest category code (as its own predictor treats codes; see engine/fast.py).
MAX_CATEGORY: Final = 1 << 24
_MAX_DEPTH: Final = 64
# Arrays xgboost reads for every node of a tree, by its num_nodes.
_NODE_ARRAYS: Final = (
    "left_children",
    "right_children",
    "parents",
    "split_indices",
    "split_conditions",
    "default_left",
    "loss_changes",
    "sum_hessian",
    "base_weights",
    "split_type",
)
# Older files may lack the last two; xgboost then fills them in.
_REQUIRED: Final = frozenset(_NODE_ARRAYS[:-2])
_FLOATS: Final = frozenset({"split_conditions", "loss_changes", "sum_hessian", "base_weights"})
_BOOSTERS: Final = frozenset({"gbtree", "dart", "gblinear"})


class InvalidModelFile(ValueError):
    """The bytes are not an XGBoost model this service can hand to xgboost; says what they are."""


def _corrupt(detail: str) -> InvalidModelFile:
    return InvalidModelFile(f"is a corrupt XGBoost model: {detail}")


def check_model_bytes(data: bytes) -> None:
    """Raise InvalidModelFile saying what `data` is, unless it is a well-formed XGBoost model."""
    kind, document = _document(data)
    _check_document(kind, document)


# --- the format ---------------------------------------------------------------------------


def _document(data: bytes) -> tuple[str, Any]:
    if not data:
        raise InvalidModelFile("is empty (0 bytes), not an XGBoost model")
    if not data.strip():
        raise InvalidModelFile(f"holds only whitespace ({len(data)} bytes), not an XGBoost model")
    what = _foreign_format(data)
    if what is not None:
        raise InvalidModelFile(what)
    # xgboost's own dispatch: '{', then (after any whitespace) '"' for JSON or a letter (a
    # UBJSON type marker) for UBJSON; anything else it refuses with an error of its own.
    body = data[1:].lstrip(b" \t\r\n\v\f")[:1]
    if data[:1] == b"{" and body.isalpha():
        try:
            return "UBJSON", _ubjson_document(data)
        except InvalidModelFile:
            if data[:64].isascii() and data[:64].decode("ascii").isprintable():
                _json_document(data)  # text, not UBJSON: JSON's complaint says more
            raise
    if data[:1] == b"{" and body == b'"':
        return "JSON", _json_document(data)
    if data.lstrip()[:1] in (b"{", b"["):
        # JSON, but not as xgboost reads it: say what it is, if it parses.
        document = _json_document(data)
        if isinstance(document, dict) and data[:1] != b"{":
            raise InvalidModelFile("is JSON that does not start with '{' (xgboost needs it first)")
        return "JSON", document
    raise InvalidModelFile(f"is neither JSON nor UBJSON (it starts with {_start(data)})")


def _foreign_format(data: bytes) -> str | None:
    """What a file that is no XGBoost model at all is, when its first bytes tell."""
    head = data[:64]
    save = "save the booster with Booster.save_model('model.json')"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return f"is a Python pickle, not an XGBoost model file: {save}"
    if head.startswith(b"\x1f\x8b"):
        return "is gzip-compressed: decompress it first"
    if head.startswith(b"PK\x03\x04"):
        return f"is a zip archive, not an XGBoost model file: {save}"
    if head.startswith(b"binf"):
        return f"is in xgboost's old binary format, which xgboost 3 no longer reads: {save}"
    if head.lstrip().startswith((b"tree\n", b"tree\r\n")) or b"\nversion=v" in head:
        return "is a LightGBM text model, not an XGBoost model"
    return None


def _start(data: bytes) -> str:
    return repr(data[:16]) + ("..." if len(data) > 16 else "")


def _json_document(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if exc.msg == "unexpected end of data":
            raise InvalidModelFile(
                f"is truncated JSON: the document stops at byte {len(data)} before it ends"
            ) from None
        error = exc
    try:
        # xgboost reads (and may write) NaN and Infinity, which strict JSON has not.
        return json.loads(data)
    except ValueError:
        raise InvalidModelFile(f"is not valid JSON: {error.msg} at byte {error.pos}") from None


# --- UBJSON (the subset xgboost writes, and everything the spec allows besides) --------------

_SCALARS: Final[dict[bytes, tuple[str, int]]] = {
    b"i": (">i1", 1),
    b"U": (">u1", 1),
    b"I": (">i2", 2),
    b"l": (">i4", 4),
    b"L": (">i8", 8),
    b"d": (">f4", 4),
    b"D": (">f8", 8),
}


class _Ubjson:
    """A strict UBJSON reader: every length checked against the bytes that are there."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise InvalidModelFile(
                f"is truncated UBJSON: it ends at byte {len(self.data)}, inside a value that "
                f"needs {n} bytes from byte {self.pos}"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def marker(self) -> bytes:
        marker = self.take(1)
        while marker == b"N":  # no-op
            marker = self.take(1)
        return marker

    def value(self, marker: bytes, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise InvalidModelFile(f"is UBJSON nested deeper than {_MAX_DEPTH} levels")
        if marker in _SCALARS:
            dtype, size = _SCALARS[marker]
            number = np.frombuffer(self.take(size), dtype=dtype)[0]
            return float(number) if marker in (b"d", b"D") else int(number)
        if marker in (b"S", b"H"):
            return self.string()
        if marker == b"C":
            return self.take(1).decode("latin-1")
        if marker == b"T":
            return True
        if marker == b"F":
            return False
        if marker == b"Z":
            return None
        if marker == b"[":
            return self.array(depth)
        if marker == b"{":
            return self.object(depth)
        raise InvalidModelFile(
            f"is not valid UBJSON: unknown type marker {marker!r} at byte {self.pos - 1}"
        )

    def count(self) -> int:
        marker = self.marker()
        if marker not in (b"i", b"U", b"I", b"l", b"L"):
            raise InvalidModelFile(
                f"is not valid UBJSON: a length has type marker {marker!r} at byte {self.pos - 1}"
            )
        n = int(self.value(marker, 0))
        if n < 0:
            raise InvalidModelFile(f"is not valid UBJSON: negative length at byte {self.pos}")
        return n

    def string(self) -> str:
        raw = self.take(self.count())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidModelFile(
                f"is not valid UBJSON: a string is not UTF-8 before byte {self.pos}"
            ) from None

    def container_header(self) -> tuple[bytes | None, int | None]:
        kind: bytes | None = None
        if self.data[self.pos : self.pos + 1] == b"$":
            self.pos += 1
            kind = self.take(1)
            if self.data[self.pos : self.pos + 1] != b"#":
                raise InvalidModelFile(
                    f"is not valid UBJSON: a typed container without a count at byte {self.pos}"
                )
        if self.data[self.pos : self.pos + 1] == b"#":
            self.pos += 1
            return kind, self.count()
        return kind, None

    def array(self, depth: int) -> Any:
        kind, n = self.container_header()
        if n is None:
            items = []
            while (marker := self.marker()) != b"]":
                items.append(self.value(marker, depth + 1))
            return items
        if kind in _SCALARS:
            dtype, size = _SCALARS[kind]
            # Checked against the bytes left before numpy sees the count.
            return np.frombuffer(self.take(n * size), dtype=dtype)
        if n > len(self.data) - self.pos:
            raise InvalidModelFile(
                f"is truncated UBJSON: an array of {n} values at byte {self.pos} is longer "
                "than the file"
            )
        return [self.value(kind or self.marker(), depth + 1) for _ in range(n)]

    def object(self, depth: int) -> dict[str, Any]:
        kind, n = self.container_header()
        found: dict[str, Any] = {}
        if n is None:
            while self.data[self.pos : self.pos + 1] != b"}":
                key = self.string()
                found[key] = self.value(self.marker(), depth + 1)
            self.take(1)
            return found
        if n > len(self.data) - self.pos:
            raise InvalidModelFile(
                f"is truncated UBJSON: an object of {n} members at byte {self.pos} is longer "
                "than the file"
            )
        for _ in range(n):
            key = self.string()
            found[key] = self.value(kind or self.marker(), depth + 1)
        return found


def _ubjson_document(data: bytes) -> Any:
    reader = _Ubjson(data)
    document = reader.value(reader.marker(), 0)
    if reader.pos != len(data):
        raise InvalidModelFile(
            f"is not valid UBJSON: {len(data) - reader.pos} bytes follow the document's end"
        )
    return document


# --- the document ---------------------------------------------------------------------------


def _check_document(kind: str, document: Any) -> None:
    if not isinstance(document, Mapping) or not isinstance(document.get("learner"), Mapping):
        if isinstance(document, Mapping) and "tree_info" in document and "learner" not in document:
            raise InvalidModelFile("is a LightGBM model (JSON dump), not an XGBoost model")
        raise InvalidModelFile(f'is {kind} but not an XGBoost model (no "learner" object)')
    learner = document["learner"]
    params = _mapping(learner, "learner_model_param", "the learner")
    n_features = _count(params.get("num_feature", "0"), "num_feature")
    n_class = _count(params.get("num_class", "0"), "num_class")
    if _count(params.get("num_target", "1"), "num_target") > 1:
        raise InvalidModelFile("is a multi-target model, which is not supported")
    booster = _mapping(learner, "gradient_booster", "the learner")
    name = booster.get("name")
    if name not in _BOOSTERS:
        raise InvalidModelFile(f"names an unknown booster {name!r} (not gbtree, dart, gblinear)")
    if name == "gblinear":
        _array(_mapping(booster, "model", "the booster"), "weights", np.float64, "the booster")
        return
    gbtree = _mapping(booster, "gbtree", "the dart booster") if name == "dart" else booster
    model = _mapping(gbtree, "model", "the booster")
    trees = model.get("trees")
    if not isinstance(trees, list):
        raise InvalidModelFile('is an XGBoost model without a "trees" array')
    tree_info = _array(model, "tree_info", np.int64, "the booster")
    if len(tree_info) != len(trees):
        raise _corrupt(f"{len(trees)} trees, but tree_info has {len(tree_info)} entries")
    # A tree's output group indexes the prediction's columns.
    if tree_info.size and (tree_info.min() < 0 or tree_info.max() >= max(n_class, 1)):
        raise _corrupt("tree_info names an output the model lacks")
    for index, tree in enumerate(trees):
        if not isinstance(tree, Mapping):
            raise _corrupt(f"tree {index} is not an object")
        _check_tree(tree, index, n_features)
    _check_stored_categories(model.get("cats"))


def _check_stored_categories(cats: Any) -> None:
    """The category labels xgboost >= 3.1 stores (read by `registry.booster_categories`)."""
    if cats is None:
        return
    encodings = cats.get("enc", []) if isinstance(cats, Mapping) else None
    if not isinstance(encodings, list | np.ndarray):
        raise _corrupt('its stored categories ("cats") are not a list')
    for index, enc in enumerate(encodings):
        where = f"the stored categories of feature {index}"
        if not isinstance(enc, Mapping):
            raise _corrupt(f"{where} are not an object")
        if "values" not in enc:
            continue
        values = _array(enc, "values", np.float64 if "offsets" not in enc else np.int64, where)
        if "offsets" not in enc:
            continue
        offsets = _array(enc, "offsets", np.int64, where)
        if not offsets.size and not values.size:
            continue  # a numerical feature
        # Text labels: UTF-8 bytes, cut at the offsets.
        if values.size and (values.min() < 0 or values.max() > 255):
            raise _corrupt(f"{where} hold a byte out of range")
        if (
            not offsets.size
            or offsets[0] != 0
            or offsets[-1] != len(values)
            or (np.diff(offsets) < 0).any()
        ):
            raise _corrupt(f"{where} have offsets that do not cut their bytes")
        raw = values.astype(np.uint8).tobytes()
        try:
            for start, end in itertools.pairwise(offsets.tolist()):
                raw[start:end].decode("utf-8")
        except UnicodeDecodeError:
            raise _corrupt(f"{where} are not UTF-8 text") from None


def _mapping(parent: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = parent.get(key)
    if not isinstance(value, Mapping):
        raise InvalidModelFile(f'is an XGBoost model whose {where} lacks its "{key}" object')
    return value


def _count(value: Any, what: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise _corrupt(f"{what} is {value!r}, not a count") from None
    if number < 0:
        raise _corrupt(f"{what} is negative ({number})")
    return number


def _array(
    parent: Mapping[str, Any], key: str, dtype: type[np.generic], where: str
) -> NDArray[Any]:
    value = parent.get(key)
    if not isinstance(value, list | np.ndarray):
        raise InvalidModelFile(f'is a corrupt XGBoost model: {where} has no "{key}" array')
    try:
        array = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError, OverflowError):
        raise InvalidModelFile(
            f'is a corrupt XGBoost model: "{key}" of {where} is not numeric'
        ) from None
    if array.ndim != 1:
        raise InvalidModelFile(
            f'is a corrupt XGBoost model: "{key}" of {where} is not a flat array'
        )
    if np.issubdtype(array.dtype, np.floating) and dtype is np.int64:
        raise InvalidModelFile(f'is a corrupt XGBoost model: "{key}" of {where} holds fractions')
    return array


def _check_tree(tree: Mapping[str, Any], index: int, n_features: int) -> None:
    where = f"tree {index}"
    param = _mapping(tree, "tree_param", where)
    n = _count(param.get("num_nodes", -1), f"num_nodes of {where}")
    if n == 0:
        raise _corrupt(f"{where} has no nodes")
    # 0 in files of xgboost < 2, 1 since; more is a multi-target (vector-leaf) tree.
    leaf_size = _count(param.get("size_leaf_vector", "1"), f"size_leaf_vector of {where}")
    if leaf_size > 1:
        raise InvalidModelFile("has multi-target (vector-leaf) trees, which are not supported")
    arrays = {
        key: _array(tree, key, np.float64 if key in _FLOATS else np.int64, where)
        for key in _NODE_ARRAYS
        if key in _REQUIRED or key in tree
    }
    for key, array in arrays.items():
        if len(array) != n:
            raise _corrupt(f"{key} of {where} has {len(array)} entries for {n} nodes")
    left, right, parents = arrays["left_children"], arrays["right_children"], arrays["parents"]
    internal = left != -1
    if ((right != -1) != internal).any():
        raise _corrupt(f"a node of {where} has one child")
    children = np.concatenate([left[internal], right[internal]])
    # Every child a node of this tree, none the root and none twice: a walk from the root
    # then ends at a leaf (no cycle, no index past the arrays).
    if children.size and (children.min() < 1 or children.max() >= n):
        raise _corrupt(f"{where} names a child node it does not have")
    if np.unique(children).size != children.size:
        raise _corrupt(f"{where} reaches a node twice")
    nodes = np.flatnonzero(internal)
    if (parents[left[internal]] != nodes).any() or (parents[right[internal]] != nodes).any():
        raise _corrupt(f"the parents of {where} disagree with its children")
    features = arrays["split_indices"][internal]
    if features.size and (features.min() < 0 or features.max() >= max(n_features, 1)):
        raise _corrupt(f"{where} splits on a feature past num_feature ({n_features})")
    # Thresholds, leaf values and covers are float32 in xgboost: 1e45 is infinite there.
    for key in _FLOATS.intersection(arrays):
        if not (np.abs(arrays[key]) <= _F32_MAX).all():
            raise _corrupt(f"{key} of {where} holds a value that is no finite float32")
    if not np.isin(arrays["default_left"], (0, 1)).all():
        raise _corrupt(f"default_left of {where} is not 0 or 1")
    split_type = arrays.get("split_type", np.zeros(n, dtype=np.int64))
    if not np.isin(split_type, (0, 1)).all():
        raise _corrupt(f"split_type of {where} is not 0 or 1")
    _check_categories(tree, where, n, np.flatnonzero(internal & (split_type == 1)))


def _check_categories(
    tree: Mapping[str, Any], where: str, n: int, categorical: NDArray[np.intp]
) -> None:
    """Each categorical split has exactly one category set, inside the categories array."""
    keys = ("categories_nodes", "categories_segments", "categories_sizes", "categories")
    present = [key in tree for key in keys]
    if not any(present) and not categorical.size:
        return
    if not all(present):
        raise _corrupt(f"{where} lacks part of its categorical splits")
    nodes, segments, sizes, codes = (_array(tree, key, np.int64, where) for key in keys)
    if not len(nodes) == len(segments) == len(sizes):
        raise _corrupt(f"the categorical splits of {where} disagree")
    if not np.array_equal(np.sort(nodes), categorical):
        raise _corrupt(f"the category sets of {where} do not match its categorical splits")
    if not nodes.size:
        return
    if segments.min() < 0 or sizes.min() < 0 or (segments + sizes).max() > len(codes):
        raise _corrupt(f"a category set of {where} lies past its categories array")
    if codes.size and (codes.min() < 0 or codes.max() >= MAX_CATEGORY):
        raise _corrupt(f"{where} has a category code out of range")
