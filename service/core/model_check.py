"""Load the model directories once in a child process, before a server loads them itself.

`model_file.py` refuses, in Python, every malformed model file we know xgboost to crash on.
What it cannot foresee (a file xgboost's C++ still aborts or segfaults on) would kill a server
mid-start without a word; loaded first in a child, it kills the child, and the server refuses
to start with a line naming the file. Start-up pays one more interpreter and its imports plus
one more load of each model: 0.6 s for `shapstream run` with the demo model (1.34 s -> 1.93 s,
median of 5, measured).

Run as `python -m service.core.model_check MODELS_DIR [--default NAME]`: one JSON object a
line on stdout, `{"loading": dir}` before each directory, then `{"problem": why}` or
`{"ok": [names]}`.
"""

import argparse
import json
import signal
import subprocess
import sys
from pathlib import Path

from service.core.schema import SCHEMA_FILE, ModelSchema

TIMEOUT_S = 300.0


def check_models_dir(
    models_dir: Path, default_model: str | None, timeout_s: float = TIMEOUT_S
) -> str | None:
    """None when every model directory loads and the default model is settled; else why."""
    command = [sys.executable, "-m", "service.core.model_check", str(models_dir)]
    if default_model is not None:
        command += ["--default", default_model]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        return f"loading the models under {models_dir} took longer than {timeout_s:g} s"
    loading: str | None = None
    for line in done.stdout.splitlines():
        try:
            said = json.loads(line)
        except ValueError:
            continue  # a library's own print
        if not isinstance(said, dict):
            continue
        if "loading" in said:
            loading = str(said["loading"])
        elif "problem" in said:
            return str(said["problem"])
        elif "ok" in said and done.returncode == 0:
            return None
    if done.returncode < 0 and loading is not None:
        try:
            how = signal.Signals(-done.returncode).name
        except ValueError:
            how = f"signal {-done.returncode}"
        return (
            f"{_model_file(Path(loading))} crashed xgboost while loading ({how}): the file is "
            "corrupt, or not a model this xgboost version reads"
        )
    errors = done.stderr.strip().splitlines()
    last = f": {errors[-1]}" if errors else ""
    return f"checking the models under {models_dir} failed (exit {done.returncode}){last}"


def _model_file(directory: Path) -> Path:
    try:
        schema = ModelSchema.model_validate_json((directory / SCHEMA_FILE).read_bytes())
    except (OSError, ValueError):
        return directory
    return directory / schema.model_file


def _say(**message: object) -> None:
    print(json.dumps(message), flush=True)


def main(argv: list[str] | None = None) -> int:
    """The child: load every model directory as the server would, saying which comes next."""
    parser = argparse.ArgumentParser(prog="python -m service.core.model_check")
    parser.add_argument("models_dir", type=Path)
    parser.add_argument("--default", default=None)
    args = parser.parse_args(argv)
    # xgboost imports scikit-learn when it is installed (a dev dependency here), which is most
    # of this child's start-up (0.8 s of 1.5 s measured); loading models needs none of it.
    sys.modules.setdefault("sklearn", None)  # type: ignore[arg-type]
    from service.core.formats.base import ModelError
    from service.core.registry import ModelRegistry, load_model_dirs, model_dirs, named_default

    try:
        models = load_model_dirs(
            model_dirs(args.models_dir), before_each=lambda d: _say(loading=str(d))
        )
        ModelRegistry(models, default_model=named_default(args.models_dir, args.default))
    except (ModelError, OSError) as exc:
        _say(problem=str(exc))
        return 0
    _say(ok=[model.name for model in models])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
