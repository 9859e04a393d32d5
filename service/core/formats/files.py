"""A model file's format, told by its bytes, and the file loaded by that format."""

from service.core.formats import lightgbm, sklearn, xgboost
from service.core.formats.base import FormatModel, ModelFormat


def formats() -> tuple[ModelFormat, ...]:
    """Every format the service reads; XGBoost last, as it explains what other files are."""
    return (lightgbm.FORMAT, sklearn.FORMAT, xgboost.FORMAT)


def load_model_file(data: bytes) -> FormatModel:
    """The model in `data`; raises InvalidModel with what the file is when none reads it.

    The first format that recognises the bytes loads them. XGBoost's loader takes the rest:
    its checker names what a file that is no model is (empty, a pickle, a zip, truncated...).
    """
    for model_format in formats():
        if model_format.recognises(data):
            return model_format.load(data)
    return xgboost.FORMAT.load(data)
