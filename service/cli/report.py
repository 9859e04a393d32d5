"""`shapstream report`: a model version's population figures over a window of UTC days, read
from the stored aggregates (no record is read): importance, drift, reasons.

The figures are those of GET /v1/models/{name}/versions/{version}/importance|drift|reasons
(service/api/population.py), computed by the same core functions; `--json` prints the body
that route answers. Also the choice of a model version and of a window of days, which
`shapstream model freeze-reference` shares.
"""

import asyncio
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final, NoReturn

import typer

from service.core.population.drift import DriftRule
from service.settings import Settings

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from service.adapters.wiring import Stores
    from service.core.population.aggregates import Aggregate
    from service.core.population.reference import Reference
    from service.core.population.report import DriftFigures
    from service.core.registry import LoadedModel

DEFAULT_DAYS: Final = 7
# Versions listed when one must be chosen; logs print versions by their first 12 characters.
SHOWN_VERSIONS: Final = 20
SHORT_VERSION: Final = 12
# The width tables are printed in when stdout is not a terminal (and COLUMNS is unset).
PIPE_WIDTH: Final = 240

# The service's drift rule, stated in the words of the HTTP API (service/api/population.py,
# which the CLI does not import; tests/unit/test_report_cli.py compares the two bodies).
RULE: Final = DriftRule()
RULE_STATEMENT: Final = (
    f"A feature drifts when at least {RULE.min_decisions} decisions are compared, its PSI is at "
    f"least {RULE.psi_threshold} and the KS test's p-value is below {RULE.ks_alpha} divided by "
    "the number of features (Bonferroni)."
)

SETTINGS_HELP: Final = (
    "Settings (environment): SHAPSTREAM_MODE, SHAPSTREAM_DATA_DIR, SHAPSTREAM_CASSANDRA_HOSTS, "
    "SHAPSTREAM_CASSANDRA_KEYSPACE; SHAPSTREAM_MODELS_DIR for the default --version. Which "
    "store they choose: `shapstream report --help`."
)

IMPORTANCE_HELP: Final = (
    "Global importance over the days: mean |phi|, mean phi and its standard deviation per "
    "feature (per class for multiclass), largest first, beside the reference's mean |phi|. "
    "As GET /v1/models/NAME/versions/VERSION/importance, from the stored aggregates.\n\n"
    + SETTINGS_HELP
)
DRIFT_HELP: Final = (
    "Each feature's attribution drift against the version's reference (PSI, Jensen-Shannon "
    "distance, KS test), the inputs' PSI and the nDCG of the importance ranking, over the days "
    "merged, with the drift rule's verdict; a version without a reference exits 1. As GET "
    "/v1/models/NAME/versions/VERSION/drift, from the stored aggregates.\n\n" + SETTINGS_HELP
)
REASONS_HELP: Final = (
    "Decisions by outcome and, among denials, how often each reason family was given, by day. "
    "As GET /v1/models/NAME/versions/VERSION/reasons, from the stored aggregates.\n\n"
    + SETTINGS_HELP
)

report_app = typer.Typer(
    no_args_is_help=True,
    help="Population figures of a model version: importance, drift, reasons.",
)

Model = Annotated[
    str | None,
    typer.Option("--model", help="The model's name. Default: the only model stored."),
]
Version = Annotated[
    str | None,
    typer.Option(
        "--version",
        help="The version, or a unique prefix of it (at least 8 characters). Default: the one "
        "SHAPSTREAM_MODELS_DIR serves, else the only one stored.",
    ),
]
Start = Annotated[
    str | None,
    typer.Option(help=f"First UTC day, YYYY-MM-DD. Default: {DEFAULT_DAYS - 1} days before --end."),
]
End = Annotated[str | None, typer.Option(help="Last UTC day, included. Default: today.")]
AsJson = Annotated[
    bool,
    typer.Option("--json", help="Print the figures as JSON: the body the HTTP API answers."),
]


# Choosing -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    """UTC days from `start` to `end`, both included."""

    start: date
    end: date

    def days(self) -> list[date]:
        from service.core.population.report import days_between

        return days_between(self.start, self.end)

    def as_json(self) -> dict[str, str]:
        return {"start": self.start.isoformat(), "end": self.end.isoformat()}


def refused(option: str, message: str) -> typer.Exit:
    """Say on one line what is wrong with an option (exit 2, as a usage error)."""
    typer.echo(f"shapstream: {option}: {message}", err=True)
    return typer.Exit(2)


def window_of(start: str | None, end: str | None) -> Window:
    """The days asked for: `end` defaults to today (UTC), `start` to DEFAULT_DAYS in all."""
    from service.core.population.report import MAX_DAYS

    last = _day(end, "--end") if end is not None else datetime.now(UTC).date()
    first = _day(start, "--start") if start is not None else last - timedelta(DEFAULT_DAYS - 1)
    if first > last:
        raise refused("--start", f"{first} is after --end {last}")
    if (last - first).days + 1 > MAX_DAYS:
        raise refused("--start", f"at most {MAX_DAYS} days, {first} to {last} is longer")
    return Window(first, last)


def _day(text: str, option: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise refused(option, f"not a date (YYYY-MM-DD): {text!r}") from None


@asynccontextmanager
async def opened_stores(settings: Settings) -> AsyncIterator["Stores"]:
    """The stores of the rule (`STORE_RULE`); in embedded mode only an existing database."""
    from service.adapters.wiring import embedded_store_exists
    from service.cli.stores import using_stores

    if settings.mode != "kafka" and not embedded_store_exists(settings):
        fail(
            f"No embedded store in {settings.data_dir}: nothing was decided there yet. Set "
            "SHAPSTREAM_DATA_DIR to the directory of `shapstream run`, or SHAPSTREAM_MODE=kafka."
        )
    async with using_stores(settings) as stores:
        yield stores


def fail(message: str) -> NoReturn:
    from service.cli.preflight import fail as said

    said(message)


@dataclass(frozen=True, slots=True)
class Chosen:
    """The model version a command works on, loaded from its stored artifact."""

    name: str
    version: str
    model: "LoadedModel"


async def choose(
    stores: "Stores", settings: Settings, name: str | None, version: str | None
) -> Chosen:
    """The version `name` and `version` give (see the options' help), or exit saying why not."""
    from service.core.export import QueryError, match_version
    from service.core.formats.base import ModelError
    from service.core.registry import LoadedModel

    names = await stores.explanations.model_names()
    stored = sorted(set(names.values()))
    if name is None:
        if not stored:
            fail("No model version is stored yet: decide something first.")
        if len(stored) > 1:
            fail(f"{len(stored)} models are stored: name one with --model ({', '.join(stored)}).")
        name = stored[0]
    versions = sorted(v for v, n in names.items() if n == name)
    if not versions:
        known = f" (stored: {', '.join(stored)})" if stored else ""
        fail(f"No model named {name!r} is stored{known}.")
    if version is None:
        chosen = _default_version(settings.models_dir, name, versions)
    else:
        try:
            chosen = match_version(version, versions)
        except QueryError as error:
            fail(f"Model {name!r}: {error.reason}; its versions: {_shown(versions)}.")
    artifact = await stores.explanations.get_model(chosen)
    if artifact is None:
        fail(f"Model {name!r} version {chosen} is named in the store, but its model is not.")
    try:
        model = LoadedModel.from_artifact(artifact)
    except ModelError as error:
        fail(f"Model {name!r} version {chosen} cannot be loaded from the store: {error}")
    return Chosen(name, chosen, model)


def _default_version(models_dir: Path, name: str, versions: Sequence[str]) -> str:
    served = served_version(models_dir, name)
    if served is not None and served in versions:
        typer.echo(f"shapstream: {name} version {served}, the one {models_dir} serves", err=True)
        return served
    if len(versions) == 1:
        return versions[0]
    fail(
        f"Model {name!r} has {len(versions)} stored versions and {models_dir} serves none of "
        f"them: choose one with --version ({_shown(versions)})."
    )


def served_version(models_dir: Path, name: str) -> str | None:
    """The version of the model `name` in `models_dir` (SHAPSTREAM_MODELS_DIR), if it has one;
    hashed from its files, without loading the model."""
    from service.core.registry import model_dirs, model_version
    from service.core.schema import SCHEMA_FILE, ModelSchema

    if not models_dir.is_dir():
        return None
    for directory in model_dirs(models_dir):
        try:
            schema = ModelSchema.model_validate_json((directory / SCHEMA_FILE).read_bytes())
            if schema.name == name:
                return model_version((directory / schema.model_file).read_bytes(), schema)
        except (OSError, ValueError):  # a directory the server would refuse: it serves nothing
            continue
    return None


def _shown(versions: Sequence[str]) -> str:
    shown = ", ".join(v[:SHORT_VERSION] for v in versions[:SHOWN_VERSIONS])
    more = len(versions) - SHOWN_VERSIONS
    return shown + (f" and {more} more" if more > 0 else "")


async def daily(stores: "Stores", chosen: Chosen, window: Window) -> dict[date, "Aggregate"]:
    """Each day's aggregate of the window (days without decisions left out)."""
    from service.core.population import report

    try:
        return await report.daily(stores.population, chosen.version, window.days())
    except ValueError as error:  # a day's parts on different edges
        fail(f"The aggregates of {chosen.name} version {chosen.version} cannot be read: {error}.")


def merged(days: Mapping[date, "Aggregate"], chosen: Chosen) -> "Aggregate | None":
    from service.core.population.aggregates import merge_all

    try:
        return merge_all(days.values())
    except ValueError as error:
        fail(
            f"The days of {chosen.name} version {chosen.version} cannot be added up: {error} "
            "(its reference was stored after some of them were kept). Ask for fewer days."
        )


# The figures, as the HTTP API answers them ---------------------------------------------------


async def importance_figures(stores: "Stores", chosen: Chosen, window: Window) -> dict[str, Any]:
    """The body of GET .../importance."""
    from service.core.population import report
    from service.core.population.aggregates import Aggregate, Edges

    schema = chosen.model.schema
    days = await daily(stores, chosen, window)
    reference = await report.reference_of(stores.population, chosen.version)
    edges = reference.edges if reference is not None else Edges.default(schema)
    total = merged(days, chosen) or Aggregate.empty(schema, edges)
    reference_rows = (
        {
            o.output: {f.feature: f.mean_abs for f in o.features}
            for o in report.importance(reference.aggregate, schema)
        }
        if reference is not None
        else {}
    )
    outputs = [
        {
            "output": o.output,
            "features": [
                {
                    "feature": f.feature,
                    "mean_abs": f.mean_abs,
                    "mean": f.mean,
                    "std": f.std,
                    "reference_mean_abs": reference_rows.get(o.output, {}).get(f.feature),
                }
                for f in o.features
            ],
        }
        for o in report.importance(total, schema)
    ]
    return {
        "model": _model(chosen),
        "window": window.as_json(),
        "decisions": total.count,
        "reference": _reference_info(reference),
        "outputs": outputs,
    }


async def drift_figures(
    stores: "Stores", chosen: Chosen, window: Window, reference: "Reference"
) -> dict[str, Any]:
    """The body of GET .../drift."""
    from service.core.population import report
    from service.core.population.aggregates import Aggregate

    schema = chosen.model.schema
    days = await daily(stores, chosen, window)
    total = merged(days, chosen) or Aggregate.empty(schema, reference.edges)

    def figures(aggregate: Aggregate) -> dict[str, Any]:
        try:
            return _drift(report.drift(aggregate, reference, schema, RULE))
        except ValueError as error:
            fail(
                f"{chosen.name} version {chosen.version} cannot be compared with its reference: "
                f"{error} (the reference was stored after these days were kept)."
            )

    return {
        "model": _model(chosen),
        "window": window.as_json(),
        "reference": _reference_info(reference),
        "rule": {
            "min_decisions": RULE.min_decisions,
            "psi_threshold": RULE.psi_threshold,
            "ks_alpha": RULE.ks_alpha,
            "statement": RULE_STATEMENT,
        },
        "total": figures(total),
        "days": [{"day": day.isoformat(), **figures(a)} for day, a in days.items()],
    }


async def reasons_figures(stores: "Stores", chosen: Chosen, window: Window) -> dict[str, Any]:
    """The body of GET .../reasons."""
    from service.core.population import report

    rows = report.reasons(await daily(stores, chosen, window))
    families: dict[str, int] = {}
    for row in rows:
        for family, count in row.families.items():
            families[family] = families.get(family, 0) + count
    return {
        "model": _model(chosen),
        "window": window.as_json(),
        "decisions": sum(r.decisions for r in rows),
        "denials": sum(r.denials for r in rows),
        "families": dict(sorted(families.items())),
        "days": [
            {
                "day": r.day.isoformat(),
                "decisions": r.decisions,
                "outcomes": r.outcomes,
                "denials": r.denials,
                "families": r.families,
                "frequencies": r.frequencies,
            }
            for r in rows
        ],
    }


def _model(chosen: Chosen) -> dict[str, str]:
    return {"name": chosen.name, "version": chosen.version}


def _reference_info(reference: "Reference | None") -> dict[str, Any] | None:
    if reference is None:
        return None
    return {"source": reference.source, "decisions": reference.aggregate.count}


def _number(value: float) -> float | None:
    # An empty side has no proportions: NaN, which JSON cannot carry.
    return None if math.isnan(value) else value


def _drift(figures: "DriftFigures") -> dict[str, Any]:
    return {
        "decisions": figures.decisions,
        "drifting": figures.drifting,
        "outputs": [
            {
                "output": o.output,
                "ndcg": _number(o.ndcg),
                "features": [
                    {
                        "feature": f.feature,
                        "n_reference": f.n_reference,
                        "n_current": f.n_current,
                        "psi": _number(f.psi),
                        "js": _number(f.js),
                        "ks": _number(f.ks),
                        "ks_p_value": _number(f.ks_p_value),
                        "drifting": f.drifting,
                    }
                    for f in o.features
                ],
            }
            for o in figures.outputs
        ],
        "inputs": [{"feature": i.feature, "psi": _number(i.psi)} for i in figures.inputs],
    }


Figures = Callable[["Stores", Chosen], Awaitable[dict[str, Any]]]
Show = Callable[["Console"], None]


# Commands -----------------------------------------------------------------------------------


@report_app.command("importance", help=IMPORTANCE_HELP)
def importance_command(
    model: Model = None,
    version: Version = None,
    start: Start = None,
    end: End = None,
    as_json: AsJson = False,
) -> None:
    """Print the importance of a version over a window (help: `IMPORTANCE_HELP`)."""
    window = window_of(start, end)

    async def figures(stores: "Stores", chosen: Chosen) -> dict[str, Any]:
        return await importance_figures(stores, chosen, window)

    body = _run(model, version, figures)
    _print(body, as_json, _importance_tables)


@report_app.command("drift", help=DRIFT_HELP)
def drift_command(
    model: Model = None,
    version: Version = None,
    start: Start = None,
    end: End = None,
    all_days: Annotated[
        bool, typer.Option("--all-days", help="Each day's figures too, after the window's.")
    ] = False,
    as_json: AsJson = False,
) -> None:
    """Print the drift of a version from its reference (help: `DRIFT_HELP`)."""
    from service.core.population.report import reference_of

    window = window_of(start, end)

    async def figures(stores: "Stores", chosen: Chosen) -> dict[str, Any]:
        reference = await reference_of(stores.population, chosen.version)
        if reference is None:
            fail(
                f"Model {chosen.name!r} version {chosen.version} has no reference to compare "
                "with: give one with `shapstream model init ... --reference DATA.csv`, or "
                f"freeze production days with `shapstream model freeze-reference {chosen.name} "
                f"{chosen.version[:SHORT_VERSION]} --start DAY --end DAY`."
            )
        return await drift_figures(stores, chosen, window, reference)

    body = _run(model, version, figures)
    _print(body, as_json, lambda b: _drift_tables(b, all_days))


@report_app.command("reasons", help=REASONS_HELP)
def reasons_command(
    model: Model = None,
    version: Version = None,
    start: Start = None,
    end: End = None,
    as_json: AsJson = False,
) -> None:
    """Print the reason frequencies of a version by day (help: `REASONS_HELP`)."""
    window = window_of(start, end)

    async def figures(stores: "Stores", chosen: Chosen) -> dict[str, Any]:
        return await reasons_figures(stores, chosen, window)

    body = _run(model, version, figures)
    _print(body, as_json, _reasons_tables)


def _run(name: str | None, version: str | None, figures: Figures) -> dict[str, Any]:
    from service.cli.stores import store_settings

    settings = store_settings()

    async def run() -> dict[str, Any]:
        async with opened_stores(settings) as stores:
            chosen = await choose(stores, settings, name, version)
            return await figures(stores, chosen)

    return asyncio.run(run())


# Printing -----------------------------------------------------------------------------------


def _print(body: dict[str, Any], as_json: bool, tables: Callable[[dict[str, Any]], Show]) -> None:
    if as_json:
        import orjson

        typer.echo(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())
        return
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # A file or a pipe has no width: a row is better long than folded.
        console = Console(highlight=False, width=PIPE_WIDTH)
    tables(body)(console)


def _console_lines(*lines: "str | Table") -> Show:
    def show(console: "Console") -> None:
        from rich.text import Text

        for line in lines:
            console.print(Text(line) if isinstance(line, str) else line)

    return show


def _header(body: Mapping[str, Any], decisions: int) -> str:
    model, window = body["model"], body["window"]
    return (
        f"{model['name']} version {model['version']}, {window['start']} to {window['end']} "
        f"(UTC): {_count(decisions, 'decision')}"
    )


def _reference_line(reference: Mapping[str, Any] | None) -> str:
    if reference is None:
        return (
            "reference: none (`shapstream model freeze-reference` makes one from production days)"
        )
    return f"reference: {reference['source']}, {_count(reference['decisions'], 'decision')}"


def _nothing(body: Mapping[str, Any]) -> str:
    return (
        f"No decisions of this version from {body['window']['start']} to {body['window']['end']}"
        " (give other days with --start and --end)."
    )


def _importance_tables(body: dict[str, Any]) -> Show:
    from rich.table import Table

    lines: list[str | Table] = [
        _header(body, body["decisions"]),
        _reference_line(body["reference"]),
    ]
    if not body["decisions"]:
        return _console_lines(*lines, _nothing(body))
    for output in body["outputs"]:
        table = _table(
            _title("importance", output["output"]),
            ("feature", "mean |φ|", "reference mean |φ|", "mean φ", "std φ"),
        )
        for row in output["features"]:
            table.add_row(
                _text(row["feature"]),
                phi(row["mean_abs"]),
                phi(row["reference_mean_abs"]),
                phi(row["mean"]),
                phi(row["std"]),
            )
        lines.append(table)
    return _console_lines(*lines)


def _drift_tables(body: dict[str, Any], all_days: bool) -> Show:
    from rich.table import Table

    total = body["total"]
    lines: list[str | Table] = [
        _header(body, total["decisions"]),
        _reference_line(body["reference"]),
    ]
    if not total["decisions"]:
        return _console_lines(*lines, _nothing(body))
    lines += _drift_span(total, "")
    if all_days:
        for day in body["days"]:
            lines += _drift_span(day, f"{day['day']} ({_count(day['decisions'], 'decision')}), ")
    lines.append(f"rule: {body['rule']['statement']}")
    return _console_lines(*lines)


def _drift_span(figures: Mapping[str, Any], prefix: str) -> "list[str | Table]":
    from rich.table import Table

    inputs = {i["feature"]: i["psi"] for i in figures["inputs"]}
    lines: list[str | Table] = []
    for output in figures["outputs"]:
        table = _table(
            prefix + _title("attribution drift", output["output"]),
            ("feature", "n", "PSI", "JS", "KS", "p", "drifting", "input PSI"),
        )
        for row in output["features"]:
            table.add_row(
                _text(row["feature"]),
                f"{row['n_current']:,}",
                statistic(row["psi"]),
                statistic(row["js"]),
                statistic(row["ks"]),
                p_value(row["ks_p_value"]),
                "DRIFTING" if row["drifting"] else "no",
                statistic(inputs.get(row["feature"])),
            )
        table.caption = f"nDCG of the importance ranking: {statistic(output['ndcg'])}"
        lines.append(table)
    drifting = ", ".join(figures["drifting"]) or "none"
    lines.append(f"{prefix}drifting: {drifting}")
    return lines


def _reasons_tables(body: dict[str, Any]) -> Show:
    from rich.table import Table

    lines: list[str | Table] = [_header(body, body["decisions"])]
    if not body["decisions"]:
        return _console_lines(*lines, _nothing(body))
    table = _table(
        "reasons",
        ("day", "decisions", "outcomes", "denials", "reason families among denials"),
        text=("outcomes", "reason families among denials"),
    )
    outcomes: dict[str, int] = {}
    for day in body["days"]:
        for outcome, count in day["outcomes"].items():
            outcomes[outcome] = outcomes.get(outcome, 0) + count
        table.add_row(
            day["day"],
            f"{day['decisions']:,}",
            _text(_counts(day["outcomes"])),
            f"{day['denials']:,}",
            _text(_families(day["families"], day["denials"])),
        )
    table.add_section()
    table.add_row(
        "all",
        f"{body['decisions']:,}",
        _text(_counts(dict(sorted(outcomes.items())))),
        f"{body['denials']:,}",
        _text(_families(body["families"], body["denials"])),
    )
    lines.append(table)
    return _console_lines(*lines)


def _table(title: str, columns: Sequence[str], text: Sequence[str] = ()) -> "Table":
    """A table whose first column and those named in `text` are text, the others numbers."""
    from rich import box
    from rich.table import Table

    table = Table(title=_text(title), title_justify="left", box=box.SIMPLE_HEAD)
    for n, column in enumerate(columns):
        if n == 0 or column in text:
            # Folded, never cut: a feature's name must be read whole on a narrow terminal.
            table.add_column(column, justify="left", overflow="fold")
        else:
            table.add_column(column, justify="right")
    return table


def _title(what: str, output: str | None) -> str:
    return what if output is None else f"{what}, class {output}"


def _text(value: str) -> "Text":
    # Text, not markup: a feature or class named "[red]" is printed as it is.
    from rich.text import Text

    return Text(value)


def phi(value: float | None) -> str:
    """An attribution as printed (margin space)."""
    return "-" if value is None else f"{value:.4f}"


def statistic(value: float | None) -> str:
    """PSI, JS, KS or nDCG as printed; "-" when there is nothing to compare."""
    return "-" if value is None else f"{value:.4f}"


def p_value(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _count(n: int, what: str) -> str:
    return f"{n:,} {what}" if n == 1 else f"{n:,} {what}s"


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{key} {n:,}" for key, n in counts.items())


def _families(families: Mapping[str, int], denials: int) -> str:
    if not families:
        return "-"
    ranked = sorted(families.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{family} {n:,} ({n / denials:.0%})" for family, n in ranked)
