"""A model file is checked before xgboost parses it: a bad one is named and said, never fatal.

xgboost's C++ loader aborts the process on an empty buffer (SIGABRT) and crashes on some
malformed files (SIGSEGV), at load or at the first prediction; the cases below were each
measured to do one or the other before the check existed.
"""

import json
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import xgboost as xgb

from service.core.formats.base import InvalidModel
from service.core.formats.files import load_model_file
from service.core.formats.xgboost_file import check_model_bytes
from service.core.model_check import check_models_dir
from service.core.registry import LoadedModel
from service.core.schema import SCHEMA_FILE

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "models" / "german-credit"
GOOD_JSON = (DEMO / "model.json").read_bytes()


def good_ubj() -> bytes:
    return bytes(xgb.Booster(model_file=bytearray(GOOD_JSON)).save_raw("ubj"))


def changed(change: Callable[[dict[str, Any]], None]) -> Callable[[], bytes]:
    def make() -> bytes:
        document = json.loads(GOOD_JSON)
        change(document)
        return json.dumps(document).encode()

    return make


def tree(document: dict[str, Any], index: int = 0) -> dict[str, Any]:
    found: dict[str, Any] = document["learner"]["gradient_booster"]["model"]["trees"][index]
    return found


def _set(where: Callable[[dict[str, Any]], dict[str, Any]], key: str, value: Any) -> Any:
    return lambda document: where(document).__setitem__(key, value)


def _first_categorical(document: dict[str, Any]) -> None:
    # Node 2 of tree 0 is numerical: marked categorical, it has no category set.
    tree(document)["split_type"][2] = 1


# name -> (the file's bytes, what the check must say). The comment says what xgboost did.
BAD: dict[str, tuple[Callable[[], bytes], str]] = {
    "empty": (lambda: b"", "is empty (0 bytes)"),  # SIGABRT at load
    "whitespace": (lambda: b"\n\n", "only whitespace"),
    "truncated JSON": (lambda: GOOD_JSON[:170_000], "is truncated JSON"),
    "one brace": (lambda: b"{", "is truncated JSON"),
    "text": (lambda: b"model, v2\n0.5,1\n", "neither JSON nor UBJSON"),
    "broken JSON": (lambda: b'{"learner": tru}', "is not valid JSON"),
    "JSON of something else": (lambda: b'{"name": "x"}', "not an XGBoost model"),
    "JSON array": (lambda: b"[1, 2]", "not an XGBoost model"),
    "pickle": (lambda: pickle.dumps({"booster": 1}), "is a Python pickle"),
    # Read by the LightGBM format, whose checker names what is wrong.
    "LightGBM text without trees": (
        lambda: b"tree\nversion=v4\nnum_class=1\nnum_tree_per_iteration=1\n",
        "is a truncated LightGBM model: it has no trees",
    ),
    "LightGBM JSON": (
        lambda: b'{"name": "tree", "version": "v4", "tree_info": []}',
        "is a LightGBM JSON dump",
    ),
    "gzip": (lambda: b"\x1f\x8b\x08\x00" + b"\x00" * 20, "gzip"),
    "UBJ garbage": (lambda: b"{L\x00\x00\x00\x05learn", "is truncated UBJSON"),  # SIGSEGV
    "truncated UBJ": (lambda: good_ubj()[:150_000], "is truncated UBJSON"),
    "UBJ bad marker": (lambda: b"{L\x00\x00\x00\x00\x00\x00\x00\x01aQ}", "unknown type marker"),
    "category set past its array": (  # SIGSEGV at load
        changed(_set(tree, "categories_segments", [99_999] * 8)),
        "lies past its categories array",
    ),
    "vector leaves": (  # SIGSEGV at load
        changed(_set(lambda d: tree(d)["tree_param"], "size_leaf_vector", "26")),
        "multi-target",
    ),
    "default_left 2": (  # SIGSEGV at prediction
        changed(lambda d: tree(d)["default_left"].__setitem__(0, 2)),
        "default_left",
    ),
    "categorical split without a set": (  # SIGABRT at prediction
        changed(_first_categorical),
        "category sets",
    ),
    "child out of range": (
        changed(lambda d: tree(d)["left_children"].__setitem__(0, 99_999)),
        "names a child node it does not have",
    ),
    "cycle": (
        changed(lambda d: tree(d)["left_children"].__setitem__(1, 0)),
        "tree 0",
    ),
    "feature out of range": (
        changed(lambda d: tree(d)["split_indices"].__setitem__(0, 99_999)),
        "splits on a feature past num_feature",
    ),
    "short array": (
        changed(lambda d: tree(d)["left_children"].pop()),
        "left_children of tree 0 has 24 entries for 25 nodes",
    ),
    "threshold beyond float32": (  # xgboost writes it back as JSON that does not parse
        changed(lambda d: tree(d)["split_conditions"].__setitem__(0, 1e145)),
        "no finite float32",
    ),
    "stored categories off their bytes": (
        changed(
            lambda d: d["learner"]["gradient_booster"]["model"]["cats"]["enc"][0].__setitem__(
                "offsets", [0, 999_999]
            )
        ),
        "stored categories of feature 0",
    ),
}


def test_good_files_pass() -> None:
    check_model_bytes(GOOD_JSON)
    check_model_bytes(good_ubj())
    # Whitespace after the brace is still JSON to xgboost (json.dump(indent=2) writes it).
    check_model_bytes(json.dumps(json.loads(GOOD_JSON), indent=2).encode())


@pytest.mark.parametrize("name", list(BAD))
def test_bad_files_say_what_they_are(name: str) -> None:
    """Through the format dispatch, as the registry loads files: the format that reads a file
    (or XGBoost's checker, for a file in no format) says what it is."""
    make, said = BAD[name]
    with pytest.raises(InvalidModel) as exc:
        load_model_file(make())
    assert said in str(exc.value)
    assert "\n" not in str(exc.value)


def model_dir(parent: Path, name: str, data: bytes) -> Path:
    directory = parent / name.replace(" ", "-")
    directory.mkdir()
    shutil.copy(DEMO / SCHEMA_FILE, directory / SCHEMA_FILE)
    (directory / "model.json").write_bytes(data)
    return directory


LOAD_EACH = """
import sys
from pathlib import Path
from service.core.registry import LoadedModel
from service.core.formats.base import InvalidModel
for directory in sys.argv[1:]:
    try:
        LoadedModel.from_directory(Path(directory))
        print("LOADED", directory, flush=True)
    except InvalidModel as exc:
        print(exc, flush=True)
"""


def test_no_bad_file_kills_the_process(tmp_path: Path) -> None:
    """Each bad file, loaded as a model directory in one process: all are refused, by name."""
    dirs = [model_dir(tmp_path, name, make()) for name, (make, _) in BAD.items()]
    done = subprocess.run(
        [sys.executable, "-c", LOAD_EACH, *map(str, dirs)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    lines = done.stdout.splitlines()
    assert len(lines) == len(BAD)
    for line, directory, (_, said) in zip(lines, dirs, BAD.values(), strict=True):
        assert line.startswith(f"{directory / 'model.json'} "), line
        assert said in line


def test_an_artifact_is_hashed_before_it_is_parsed() -> None:
    model = LoadedModel.from_directory(DEMO)
    forged = model.artifact().model_copy(update={"model_bytes": b""})
    with pytest.raises(InvalidModel, match="tampered or corrupt"):
        LoadedModel.from_artifact(forged)


def test_a_model_xgboost_loads_but_cannot_score_is_refused(tmp_path: Path) -> None:
    """An intercept outside the link's range: xgboost loads it and fails every prediction."""
    document = json.loads(GOOD_JSON)
    document["learner"]["learner_model_param"]["base_score"] = "[2E0]"
    directory = model_dir(tmp_path, "bad-intercept", json.dumps(document).encode())
    with pytest.raises(InvalidModel, match=r"is refused by xgboost: .*base_score must be in"):
        LoadedModel.from_directory(directory)
    # And a binary schema over a model of three outputs.
    document = json.loads(GOOD_JSON)
    document["learner"]["learner_model_param"]["num_class"] = "3"
    directory = model_dir(tmp_path, "three-outputs", json.dumps(document).encode())
    with pytest.raises(InvalidModel, match="3 margins a row, a binary model 1"):
        LoadedModel.from_directory(directory)


def test_the_child_names_the_file_that_crashed_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What no check foresees crashes the child process, not the server, and is named."""
    models = tmp_path / "models"
    models.mkdir()
    broken = model_dir(models, "broken", GOOD_JSON)
    # Stands in for an interpreter whose xgboost crashes on that directory's file.
    crashing = tmp_path / "python"
    crashing.write_text(f'#!/bin/sh\necho \'{{"loading": "{broken}"}}\'\nkill -SEGV $$\n')
    crashing.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(crashing))
    said = check_models_dir(models, None)
    assert said is not None
    assert said.startswith(f"{broken / 'model.json'} crashed xgboost while loading (SIGSEGV)")


def test_the_child_reports_what_the_registry_refuses(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    model_dir(models, "german-credit", GOOD_JSON)
    assert check_models_dir(models, None) is None
    assert check_models_dir(models, "german-credit") is None
    said = check_models_dir(models, "nope")
    assert said is not None
    assert "the default model 'nope' (SHAPSTREAM_DEFAULT_MODEL" in said
    (models / "german-credit" / "model.json").write_bytes(b"")
    said = check_models_dir(models, None)
    assert (
        said
        == f"{models / 'german-credit' / 'model.json'} is empty (0 bytes), not an XGBoost model"
    )
