"""`shapstream audit`: export decision records from the store to a file, and verify such a file."""

import asyncio
import getpass
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Final

import typer

from service.core.export import ExportFormat
from service.settings import Settings

if TYPE_CHECKING:
    from service.core.export import AuditExport, ExportQuery
    from service.core.records import DecisionRecord
    from service.ports import AccessStore, ExplanationStore

audit_app = typer.Typer(no_args_is_help=True, help="Audit export and verification.")

# Problems printed by `verify`; the count of all of them follows.
SHOWN_PROBLEMS: Final = 20
# Records between two progress updates: often enough to watch, rarely enough to cost nothing.
PROGRESS_EVERY: Final = 500


def _moment(text: str, name: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as error:
        raise typer.BadParameter(f"not an ISO 8601 time: {text!r}", param_hint=name) from error
    if moment.tzinfo is None:
        raise typer.BadParameter(f"{text!r} needs a time zone (e.g. Z)", param_hint=name)
    try:
        return moment.astimezone(UTC)
    except OverflowError as error:
        raise typer.BadParameter(f"{text!r} is out of range in UTC", param_hint=name) from error


@audit_app.command("export")
def export_command(
    start: Annotated[str, typer.Option(help="Inclusive; ISO 8601 with a time zone.")],
    end: Annotated[str, typer.Option(help="Exclusive; ISO 8601 with a time zone.")],
    out: Annotated[Path, typer.Option("--out", help="The file to write.", dir_okay=False)],
    model_version: Annotated[
        str | None, typer.Option(help="Only this model version (default: all).")
    ] = None,
    decision: Annotated[
        str | None, typer.Option(help="Only this outcome: approve, deny, or a class.")
    ] = None,
    export_format: Annotated[
        ExportFormat, typer.Option("--format", help="jsonl or csv.")
    ] = ExportFormat.JSONL,
) -> None:
    """Write the decisions of [start, end) with their explanations and a manifest to --out.

    Reads the store of SHAPSTREAM_MODE directly (Cassandra, or the embedded SQLite file) and
    records the export in the access log as `cli:<user>`.
    """
    since, until = _moment(start, "--start"), _moment(end, "--end")
    if until <= since:
        raise typer.BadParameter("must be after --start", param_hint="--end")
    settings = Settings()
    started = time.perf_counter()
    rows = asyncio.run(_export(settings, since, until, model_version, decision, export_format, out))
    elapsed = time.perf_counter() - started
    typer.echo(
        f"{rows} rows in {elapsed:.1f} s ({rows / elapsed if elapsed else 0:,.0f} rows/s) -> {out}"
    )


@audit_app.command("verify")
def verify_command(
    file: Annotated[Path, typer.Argument(help="An export file.", exists=True, dir_okay=False)],
) -> None:
    """Recompute every row's record hash, the chain and the manifest; name what changed."""
    from service.core.export import verify

    report = verify(file)
    if report.ok:
        typer.echo(f"OK: {report.rows} rows, manifest matches")
        return
    for problem in report.problems[:SHOWN_PROBLEMS]:
        typer.echo(str(problem))
    if report.problem_count > SHOWN_PROBLEMS:
        typer.echo(f"... and {report.problem_count - SHOWN_PROBLEMS} more")
    typer.echo(f"FAILED: {report.problem_count} problem(s) in {report.rows} rows", err=True)
    raise typer.Exit(1)


async def _export(
    settings: Settings,
    start: datetime,
    end: datetime,
    model_version: str | None,
    decision: str | None,
    export_format: ExportFormat,
    out: Path,
) -> int:
    from service.core.access import AccessEntry, Action
    from service.core.export import (
        AuditExport,
        ExportQuery,
        access_target,
        scan_versions,
        schemas_from,
    )

    async with _open_stores(settings) as (store, access):
        versions = (model_version,) if model_version else tuple(await store.model_versions())
        query = ExportQuery(start, end, versions, decision, export_format)
        target = access_target(query, model_version)
        entry = AccessEntry(datetime.now(UTC), _cli_user(), Action.AUDIT_EXPORT, target)
        await access.record(entry)
        export = AuditExport(query, schemas_from(store.get_model))
        records = scan_versions(store, versions, start, end)
        async with aclosing(records):
            await _write(export, records, _progress_scale(settings, query), out)
        return export.rows


async def _write(
    export: "AuditExport",
    records: AsyncIterator["DecisionRecord"],
    scale: tuple[Callable[["DecisionRecord"], int], int],
    out: Path,
) -> None:
    """Write the export to `out` under a rich progress bar over the scan."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    position, total = scale
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%  {task.fields[rows]:,} records read"),
        TimeElapsedColumn(),
    )
    partial = out.with_name(out.name + ".partial")
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task("exporting", total=total, rows=0)

        async def tracked() -> AsyncIterator["DecisionRecord"]:
            seen = 0
            async for record in records:
                seen += 1
                if seen % PROGRESS_EVERY == 0:
                    progress.update(task, completed=position(record), rows=seen)
                yield record
            progress.update(task, completed=total, rows=seen)

        # The file gets its name only once complete: a failed export leaves `.partial` behind.
        with partial.open("wb") as handle:
            async for chunk in export.chunks(tracked()):
                handle.write(chunk)
    partial.replace(out)


def _progress_scale(
    settings: Settings, query: "ExportQuery"
) -> tuple[Callable[["DecisionRecord"], int], int]:
    """Where a record stands in the scan, and the end of the scale.

    Cassandra reads (version, day, bucket) partitions in order, and a record's bucket follows
    from its transaction id; SQLite reads each version in time order.
    """
    from service.adapters.record_codec import to_epoch_ms

    versions = {version: index for index, version in enumerate(query.model_versions)}
    start_ms, end_ms = to_epoch_ms(query.start), to_epoch_ms(query.end)
    if settings.mode == "kafka":
        from service.adapters.cassandra_store import day_bucket, utc_days

        days = {day: index for index, day in enumerate(utc_days(start_ms, end_ms))}
        buckets = settings.cassandra.day_buckets

        def partition(record: "DecisionRecord") -> int:
            day = days[record.decided_at.astimezone(UTC).date()]
            bucket = day_bucket(record.transaction_id, buckets)
            return (versions[record.model.version] * len(days) + day) * buckets + bucket + 1

        return partition, max(len(versions) * len(days) * buckets, 1)
    span = end_ms - start_ms

    def moment(record: "DecisionRecord") -> int:
        return versions[record.model.version] * span + to_epoch_ms(record.decided_at) - start_ms

    return moment, max(len(versions) * span, 1)


def _cli_user() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no login name and no passwd entry (some containers)
        return "cli:unknown"


@asynccontextmanager
async def _open_stores(
    settings: Settings,
) -> AsyncIterator[tuple["ExplanationStore", "AccessStore"]]:
    """The stores of SHAPSTREAM_MODE; in embedded mode only an existing database."""
    from service.adapters.sqlite_store import DB_FILE
    from service.cli.stores import open_stores

    if settings.mode != "kafka" and not (settings.data_dir / DB_FILE).exists():
        raise typer.BadParameter(f"no embedded database in {settings.data_dir}")
    async with open_stores(settings) as stores:
        yield stores
