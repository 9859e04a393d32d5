"""What the service needs of a tree-ensemble model, whatever framework trained it.

A format module (`xgboost.py`, `lightgbm.py`, `sklearn.py`) reads its framework's model file
into a `FormatModel`: the framework's own scoring and exact SHAP (the references), what the
model decides (task, link, outputs), how it checks a schema against itself, and its trees as a
`Forest`, the one layout both native engines (`service.core.engine.fast`) read.

A Forest holds every tree's nodes concatenated. A row is routed by each internal node's
`flags` (below); every format's routing rule is one combination of them, so the kernel has no
per-format code. Inputs are float32 (the encoder's rows): a threshold compares against the
float32 value widened to float64, which is how every supported framework compares (xgboost's
float32 thresholds are exact in float64; LightGBM and scikit-learn compare doubles).
"""

from dataclasses import dataclass
from enum import IntFlag, StrEnum
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from service.core.engine.base import Engine, FloatMatrix
from service.core.schema import ModelSchema, Task


class ModelError(Exception):
    """A model directory, artifact or version that cannot be served."""


class InvalidModel(ModelError):
    """The model file and schema do not form a servable model."""


class UnsupportedModel(ValueError):
    """The native engines cannot reproduce this model: the framework's own code is used."""


class NodeFlag(IntFlag):
    """How an internal node routes a value (uint8 per node in `Forest.flags`)."""

    # Missing values (NaN; and zeros under ZERO_MISSING) go left, else right.
    DEFAULT_LEFT = 1
    # A categorical split: the value's integer part is a category code tested against the
    # node's set in `cat_words`; NaN follows DEFAULT_LEFT.
    CATEGORICAL = 2
    # Numerical: `x <= threshold` goes left (LightGBM, scikit-learn); else `x < threshold`
    # goes left (xgboost).
    LESS_EQUAL = 4
    # NaN is read as 0.0 before the decision (LightGBM, missing_type None or Zero).
    NAN_AS_ZERO = 8
    # A value within 1e-35f (float32) of zero takes the default direction (LightGBM,
    # missing_type Zero).
    ZERO_MISSING = 16
    # Categorical: codes in the set go left (LightGBM, scikit-learn); else right (xgboost).
    CAT_IN_SET_LEFT = 32
    # Categorical: codes that cannot be in any set (negative, >= 2**24, or past the node's
    # bit field) go left (xgboost); else right (LightGBM, scikit-learn).
    CAT_OTHER_LEFT = 64


class Accumulation(StrEnum):
    """How the framework adds leaf values into a margin, which bit-exact scoring repeats."""

    # Leaves are float32, added in float32 to the intercept, tree by tree (xgboost).
    FLOAT32 = "float32"
    # Leaves are float64, added in float64 to the intercept, tree by tree.
    FLOAT64 = "float64"


class Link(StrEnum):
    """How a margin becomes the served prediction."""

    IDENTITY = "identity"  # regression values; probabilities of averaged forests
    SIGMOID = "sigmoid"  # binary log-odds; logistic regression objectives
    EXP = "exp"  # log-link regression (Poisson, gamma, Tweedie)
    SOFTMAX = "softmax"  # multiclass margins (one per class)


@dataclass(frozen=True, eq=False)
class Forest:
    """Every tree's nodes concatenated, in tree order: what the native engines take.

    Per tree: `tree_ptr[t]:tree_ptr[t + 1]` are its nodes, root first; `tree_output[t]` is
    the output (class) it adds to. Per node, with child indices relative to the tree's first
    node (-1 in `left` marks a leaf): `left`, `right`, `feature`, `threshold` (numerical
    splits), `flags` (NodeFlag), the category set as `cat_words[cat_ptr[i]:cat_ptr[i + 1]]`
    (bit c of the words set when code c is in it), `value` (a leaf's output, already scaled
    as the framework adds it: learning rate folded in), `cover` (the training weight that
    reached the node: TreeSHAP's path weights).

    The margin of output g is `base[g]` plus the leaves of its trees, summed in tree order as
    `accumulation` says, then divided by `divisor` (random forests average their trees).

    Any negative `left` marks a leaf; nodes no root reaches are ignored; a split whose cover
    is zero gives both children zero weight (their expected value counts as 0). Inputs are the
    encoder's rows: categorical values are whole codes or NaN, so the routing of fractional
    or negative codes (where frameworks differ) never decides a served row.
    """

    n_features: int
    n_outputs: int
    tree_ptr: NDArray[np.int64]
    tree_output: NDArray[np.int32]
    left: NDArray[np.int32]
    right: NDArray[np.int32]
    feature: NDArray[np.int32]
    threshold: NDArray[np.float64]
    flags: NDArray[np.uint8]
    cat_ptr: NDArray[np.int64]
    cat_words: NDArray[np.uint32]
    value: NDArray[np.float64]
    cover: NDArray[np.float64]
    base: NDArray[np.float64]
    accumulation: Accumulation = Accumulation.FLOAT64
    divisor: float = 1.0

    @property
    def n_trees(self) -> int:
        return len(self.tree_output)

    @property
    def n_nodes(self) -> int:
        return len(self.left)


@dataclass(frozen=True, slots=True)
class ModelDescription:
    """What `model init` reads from a model file to write its schema."""

    task: Task
    feature_names: tuple[str, ...] | None
    # Features the model splits as categories, with the categories it stored (in code order)
    # when it stored them; an empty tuple when it did not.
    categorical: dict[str, tuple[str, ...]]
    n_classes: int
    # Class labels in output order when the model stores them (binary: the margin speaks of
    # the last one, `classes[1]`); empty when it does not.
    classes: tuple[str, ...] = ()
    # False when the framework refuses missing values (scikit-learn's GradientBoosting): every
    # feature is then required.
    missing_values: bool = True


class FormatModel(Protocol):
    """One model file loaded by its framework."""

    format: str  # "xgboost", "lightgbm", "sklearn"
    framework_version: str
    n_features: int
    n_outputs: int
    objective: str  # the framework's own name for it
    task: Task
    link: Link

    def check_schema(self, schema: ModelSchema) -> None:
        """Raise InvalidModel naming how `schema` does not describe this model."""
        ...

    def forest(self) -> Forest:
        """The trees in the native engines' layout; raises UnsupportedModel."""
        ...

    def predict_margins(self, x: FloatMatrix) -> NDArray[np.float64]:
        """The framework's own raw scores, shape (rows, outputs)."""
        ...

    def reference_engine(self) -> Engine:
        """The framework's own exact TreeSHAP (the correctness reference)."""
        ...

    def describe(self) -> ModelDescription:
        """What `model init` needs to write a schema."""
        ...


def check_task(schema: ModelSchema, task: Task, objective: str, n_classes: int) -> None:
    """Raise InvalidModel unless `schema` asks for the task (and classes) the model decides."""
    if schema.task is not task:
        raise InvalidModel(
            f"objective {objective!r} is a {task.value} model, the schema says {schema.task.value}"
        )
    if task is Task.MULTICLASS and n_classes != len(schema.classes):
        raise InvalidModel(
            f"the model has {n_classes} classes, the schema names {len(schema.classes)}"
        )


class ModelFormat(Protocol):
    """A framework's model files: recognised by their bytes, loaded into a FormatModel."""

    name: str

    def recognises(self, data: bytes) -> bool:
        """Whether `data` looks like this format's model file (cheap: no parsing)."""
        ...

    def load(self, data: bytes) -> FormatModel:
        """The model; raises InvalidModel with one line naming what is wrong."""
        ...
