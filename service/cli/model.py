"""`shapstream model`: make model directories (bring your own model, or the demo)."""

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from service.cli.report import Window
    from service.settings import Settings

model_app = typer.Typer(
    no_args_is_help=True,
    help="Create model directories the service can serve; freeze a version's reference.",
)

ModelFile = Annotated[
    Path,
    typer.Argument(
        exists=True,
        dir_okay=False,
        help="Model file: XGBoost (JSON or UBJ), LightGBM (text), scikit-learn ensemble (.skops).",
    ),
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
    from service.core.registry import DEFAULT_MODEL_FILE, LoadedModel, model_dirs, named_default

    model = LoadedModel.from_directory(directory)
    typer.echo(f"wrote {directory / model.schema.model_file} and {directory / 'schema.json'}")
    framework = model.framework
    written = framework.framework_version or "an unknown version"
    typer.echo(f"format {framework.format} (written by {framework.format} {written})")
    typer.echo(f"model {model.name} ({model.schema.task.value}), version {model.version}")
    served = model_dirs(directory.parent)
    # A hint, not configuration: the server checks the setting itself at start.
    named = os.environ.get("SHAPSTREAM_DEFAULT_MODEL") or named_default(directory.parent, None)
    if len(served) > 1 and not named:
        typer.echo(
            f"note: {directory.parent} now holds {len(served)} models; a server started on it "
            f"needs to know the model a request without `model` gets: write its name in "
            f"{directory.parent / DEFAULT_MODEL_FILE}, or set SHAPSTREAM_DEFAULT_MODEL"
        )


INIT_HELP = (
    "Turn a model file into a model directory (the model file + schema.json). The format is "
    "told by the file: XGBoost (JSON or UBJ), LightGBM (text), scikit-learn ensembles (a .skops "
    "file, converted into a forest file; serving needs no scikit-learn).\n\n"
    "The server serves every model directory under SHAPSTREAM_MODELS_DIR; with more than one, "
    "name the model a request without `model` gets in the models directory's default-model "
    "file or SHAPSTREAM_DEFAULT_MODEL (the server does not start otherwise). Then edit "
    "schema.json: reason families, and required features "
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
    reference: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="A CSV of reference applicants (the validation set: a column per feature, "
            "others ignored): explained once, it is the version's baseline for drift.",
        ),
    ] = None,
) -> None:
    """Turn a model file into a model directory (help: `INIT_HELP`)."""
    from service.core.formats.base import ModelError
    from service.tools.model_init import init_model_dir

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
    if reference is not None:
        _write_reference(dest_dir, reference)
    _written(dest_dir)


def _write_reference(dest_dir: Path, reference: Path) -> None:
    from service.core.formats.base import ModelError
    from service.tools.reference import write_reference

    try:
        written = write_reference(dest_dir, reference)
    except (ModelError, ValueError) as exc:
        typer.echo(f"error: the reference: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"reference: {written.source}, {written.aggregate.count} decisions explained")


# Decisions a frozen reference needs at least (`--min-decisions`): the drift rule compares a
# day only from this many on, and a thinner reference would be noisier than the day.
MIN_REFERENCE_DECISIONS = 500

FREEZE_HELP = (
    "Make production days a model version's reference for drift: the stored aggregates of the "
    "days from --start to --end (UTC, both included) added up and stored as its reference, "
    "once (a version's reference never changes; one it already has is kept and this is "
    "refused). For a version served without a reference (`model init --reference` makes one): "
    "its aggregates were kept on the default edges, which the reference keeps, so the days "
    "after it compare with it bin for bin.\n\n"
    "Settings (environment): SHAPSTREAM_MODE, SHAPSTREAM_DATA_DIR, SHAPSTREAM_CASSANDRA_HOSTS, "
    "SHAPSTREAM_CASSANDRA_KEYSPACE; which store they choose: `shapstream report --help`."
)


@model_app.command("freeze-reference", help=FREEZE_HELP)
def freeze_reference(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The model's name.")],
    version: Annotated[
        str,
        typer.Argument(
            metavar="VERSION",
            help="Its version, or a unique prefix of it (at least 8 characters).",
        ),
    ],
    start: Annotated[str, typer.Option(help="First UTC day, YYYY-MM-DD.")],
    end: Annotated[str, typer.Option(help="Last UTC day, YYYY-MM-DD, included.")],
    min_decisions: Annotated[
        int, typer.Option(min=1, help="Refuse days holding fewer decisions in all.")
    ] = MIN_REFERENCE_DECISIONS,
) -> None:
    """Freeze production days as a version's reference (help: `FREEZE_HELP`)."""
    import asyncio

    from service.cli.report import window_of
    from service.cli.stores import store_settings

    window = window_of(start, end)
    settings = store_settings()
    frozen = asyncio.run(_freeze(settings, name, version, window, min_decisions))
    typer.echo(f"reference of {name} version {frozen[0]}: {frozen[1]}")


async def _freeze(
    settings: "Settings", name: str, version: str, window: "Window", min_decisions: int
) -> tuple[str, str]:
    """Store the reference; the version and the reference's source."""
    from service.cli.report import choose, daily, fail, merged, opened_stores
    from service.core.population.aggregates import Edges
    from service.core.population.reference import freeze
    from service.core.population.report import reference_of

    async with opened_stores(settings) as stores:
        chosen = await choose(stores, settings, name, version)
        label = f"{chosen.name} version {chosen.version}"
        existing = await reference_of(stores.population, chosen.version)
        if existing is not None:
            fail(
                f"{label} already has a reference ({existing.source}); a version's reference "
                "never changes."
            )
        schema = chosen.model.schema
        days = await daily(stores, chosen, window)
        default = Edges.default(schema).fingerprint
        other = [day for day, aggregate in days.items() if aggregate.edges != default]
        if other:
            fail(
                f"The aggregates of {label} on {other[0]} were not binned on the default edges "
                "(the version had a reference when they were kept): they cannot be frozen."
            )
        total = merged(days, chosen)
        count = 0 if total is None else total.count
        if total is None or count < min_decisions:
            fail(
                f"{label} has {count:,} decisions from {window.start} to {window.end}; a "
                f"reference needs at least {min_decisions:,} (--min-decisions): choose more days."
            )
        source = f"production days {window.start} to {window.end} ({count} decisions)"
        reference = freeze(total, schema, source)
        if not await stores.population.put_reference(chosen.version, reference.to_bytes()):
            fail(f"{label} was given a reference meanwhile; a version's reference never changes.")
        return chosen.version, source


DEMO_DIRS = {"xgboost": "models/german-credit", "lightgbm": "models/german-credit-lightgbm"}


@model_app.command("train-demo")
def train_demo(
    data: Annotated[
        Path, typer.Option(exists=True, dir_okay=False, help="The German credit CSV.")
    ] = Path("data/german_credit.csv"),
    framework: Annotated[
        str, typer.Option(help="xgboost (the demo) or lightgbm (the second shipped model).")
    ] = "xgboost",
    out: Annotated[
        Path | None,
        typer.Option(file_okay=False, help="Model directory to write (default: the shipped one)."),
    ] = None,
) -> None:
    """Train a German credit demo model (reproducible byte for byte)."""
    from service.core.registry import LoadedModel
    from service.tools.demo import train_demo as train_xgboost
    from service.tools.demo_lightgbm import train_demo_lightgbm

    if framework not in DEMO_DIRS:
        raise typer.BadParameter(
            f"{framework!r}: choose xgboost or lightgbm", param_hint="--framework"
        )
    out = out or Path(DEMO_DIRS[framework])
    train = train_xgboost if framework == "xgboost" else train_demo_lightgbm
    train(data, out)
    _written(out)
    typer.echo(LoadedModel.from_directory(out).schema.description)


if __name__ == "__main__":
    model_app()
