"""`shapstream model`: make model directories (bring your own model, or the demo)."""

import os
from pathlib import Path
from typing import Annotated

import typer

model_app = typer.Typer(
    no_args_is_help=True, help="Create model directories the service can serve."
)

ModelFile = Annotated[
    Path, typer.Argument(exists=True, dir_okay=False, help="XGBoost model file (JSON or UBJ).")
]
Dest = Annotated[Path, typer.Argument(file_okay=False, help="New model directory to write.")]


def _load_categories(path: Path | None) -> dict[str, list[str]]:
    if path is None:
        return {}
    import orjson

    loaded = orjson.loads(path.read_bytes())
    valid = isinstance(loaded, dict) and all(
        isinstance(v, list) and all(isinstance(c, str) for c in v) for v in loaded.values()
    )
    if not valid:
        raise typer.BadParameter("expected a JSON object: feature name -> [category, ...]")
    return {str(k): list(v) for k, v in loaded.items()}


def _written(directory: Path) -> None:
    from service.core.registry import LoadedModel, model_dirs

    model = LoadedModel.from_directory(directory)
    typer.echo(f"wrote {directory / model.schema.model_file} and {directory / 'schema.json'}")
    typer.echo(f"model {model.name} ({model.schema.task.value}), version {model.version}")
    served = model_dirs(directory.parent)
    # A hint, not configuration: the server checks the setting itself at start.
    if len(served) > 1 and not os.environ.get("SHAPSTREAM_DEFAULT_MODEL"):
        typer.echo(
            f"note: {directory.parent} now holds {len(served)} models; a server started on it "
            "needs SHAPSTREAM_DEFAULT_MODEL, the model a request without `model` gets"
        )


INIT_HELP = (
    "Turn an XGBoost model file into a model directory (model.json + schema.json).\n\n"
    "The server serves every model directory under SHAPSTREAM_MODELS_DIR; with more than one, "
    "set SHAPSTREAM_DEFAULT_MODEL to the model a request without `model` gets (the server does "
    "not start otherwise). Then edit schema.json: reason families, and required features "
    '("nullable": false).'
)


@model_app.command("init", help=INIT_HELP)
def init(
    model_file: ModelFile,
    dest_dir: Dest,
    name: Annotated[
        str | None, typer.Option(help="Model name (default: the directory's name).")
    ] = None,
    classes: Annotated[
        str | None, typer.Option(help="Multiclass labels in class order, comma separated.")
    ] = None,
    categories: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="JSON object feature -> categories in code order, for models that lack them.",
        ),
    ] = None,
    protected: Annotated[
        str | None, typer.Option(help="Protected attributes, comma separated.")
    ] = None,
) -> None:
    """Turn an XGBoost model file into a model directory (help: `INIT_HELP`)."""
    from service.core.model_init import init_model_dir
    from service.core.registry import ModelError

    try:
        init_model_dir(
            model_file,
            dest_dir,
            name,
            classes=classes.split(",") if classes else None,
            categories=_load_categories(categories),
            protected=set(protected.split(",")) if protected else set(),
        )
    except ModelError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    _written(dest_dir)


@model_app.command("train-demo")
def train_demo(
    data: Annotated[
        Path, typer.Option(exists=True, dir_okay=False, help="The German credit CSV.")
    ] = Path("data/german_credit.csv"),
    out: Annotated[Path, typer.Option(file_okay=False, help="Model directory to write.")] = Path(
        "models/german-credit"
    ),
) -> None:
    """Train the German credit demo model (reproducible byte for byte)."""
    from service.core.demo import train_demo as train
    from service.core.registry import LoadedModel

    train(data, out)
    _written(out)
    typer.echo(LoadedModel.from_directory(out).schema.description)


if __name__ == "__main__":
    model_app()
