"""Type stub of the compiled kernel (module.c, forest.c, shap.c, predict.c)."""

from typing import Any

# Both builders take a Forest's fields (service/core/formats/base.py) in this order:
# n_features, n_outputs, tree_ptr (int64), tree_output (int32), left, right, feature (int32),
# threshold (float64), flags (uint8), cat_ptr (int64), cat_words (uint32), value, cover,
# base (float64), divisor; C-contiguous. ValueError when they do not form a forest.

def build(
    n_features: int,
    n_outputs: int,
    tree_ptr: Any,
    tree_output: Any,
    left: Any,
    right: Any,
    feature: Any,
    threshold: Any,
    flags: Any,
    cat_ptr: Any,
    cat_words: Any,
    value: Any,
    cover: Any,
    base: Any,
    divisor: float,
    dmax: int,
    table_limit_bytes: int,
    /,
) -> object: ...
def shap(model: object, x: Any, out: Any, /) -> None: ...
def info(model: object, /) -> dict[str, int]: ...
def bias(model: object, /) -> list[float]: ...
def predictor(
    n_features: int,
    n_outputs: int,
    tree_ptr: Any,
    tree_output: Any,
    left: Any,
    right: Any,
    feature: Any,
    threshold: Any,
    flags: Any,
    cat_ptr: Any,
    cat_words: Any,
    value: Any,
    cover: Any,
    base: Any,
    divisor: float,
    float64_accumulation: bool,
    /,
) -> object: ...
def predict(model: object, x: Any, out: Any, /) -> None: ...
