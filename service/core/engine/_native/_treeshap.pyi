"""Type stub of the compiled kernel (treeshap.c)."""

from typing import Any

def build(
    n_features: int,
    n_groups: int,
    dmax: int,
    table_limit_bytes: int,
    tree_ptr: Any,
    group: Any,
    left: Any,
    right: Any,
    feat: Any,
    thr: Any,
    dleft: Any,
    iscat: Any,
    cat_ptr: Any,
    cat_words: Any,
    value: Any,
    cover: Any,
    base: Any,
    /,
) -> object: ...
def shap(model: object, x: Any, out: Any, /) -> None: ...
def info(model: object, /) -> dict[str, int]: ...
def bias(model: object, /) -> list[float]: ...
def predictor(
    n_features: int,
    n_groups: int,
    link: int,
    tree_ptr: Any,
    group: Any,
    left: Any,
    right: Any,
    feat: Any,
    value: Any,
    dleft: Any,
    iscat: Any,
    cat_ptr: Any,
    cat_words: Any,
    base_score: Any,
    /,
) -> object: ...
def predict(model: object, x: Any, out: Any, /) -> None: ...
def predictor_base(model: object, /) -> list[float]: ...
