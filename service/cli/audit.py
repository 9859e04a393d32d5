"""`shapstream audit`: export decision records from the store to a file, and verify such a file."""

import asyncio
import getpass
import os
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from datetime import time as dt_time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, BinaryIO, Final

import typer

from service.core.export import MIN_VERSION_PREFIX, ExportFormat
from service.settings import Settings

if TYPE_CHECKING:
    from service.adapters.wiring import ScanProgress, Stores
    from service.core.export import AuditExport
    from service.core.records import DecisionRecord

audit_app = typer.Typer(no_args_is_help=True, help="Audit export and verification.")

# Problems printed by `verify`; the count of all of them follows.
SHOWN_PROBLEMS: Final = 20
# Records between two progress updates: often enough to watch, rarely enough to cost nothing.
PROGRESS_EVERY: Final = 500


def _refused(name: str, message: str) -> typer.Exit:
    """Say on one line what is wrong with an option (no usage box: paths would wrap in it)."""
    typer.echo(f"shapstream audit: {name}: {message}", err=True)
    return typer.Exit(2)


def _moment(text: str, name: str) -> datetime:
    """An ISO 8601 time with a time zone, or a bare date (midnight UTC), in UTC."""
    try:
        day = date.fromisoformat(text)
    except ValueError:
        pass
    else:
        # A date alone: the service's days are UTC days (rows, manifests, Cassandra's days).
        return datetime.combine(day, dt_time(), UTC)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as error:
        raise _refused(name, f"not an ISO 8601 time: {text!r}") from error
    if moment.tzinfo is None:
        raise _refused(
            name, f"{text!r} has no time zone: add one, e.g. {moment.isoformat()}Z for UTC"
        )
    try:
        return moment.astimezone(UTC)
    except OverflowError as error:
        raise _refused(name, f"{text!r} is out of range in UTC") from error


def _rows(count: int) -> str:
    return f"{count:,} row" if count == 1 else f"{count:,} rows"


def _check_out(out: Path, force: bool) -> None:
    """Refuse, before anything is read or logged, a file that cannot or must not be written."""
    folder = out.parent
    if not folder.is_dir():
        raise _refused(
            "--out", f"the folder {folder} does not exist: create it first (mkdir -p {folder})"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise _refused("--out", f"the folder {folder} is not writable")
    if out.exists() and not force:
        raise _refused(
            "--out", f"{out} exists: choose another file, or add --force to overwrite it"
        )


@audit_app.command("export")
def export_command(
    start: Annotated[
        str, typer.Option(help="Inclusive; ISO 8601 with a time zone, or a date (midnight UTC).")
    ],
    out: Annotated[Path, typer.Option("--out", help="The file to write.", dir_okay=False)],
    end: Annotated[
        str | None,
        typer.Option(
            help="Exclusive; ISO 8601 with a time zone, or a date (midnight UTC). Default: now."
        ),
    ] = None,
    model_version: Annotated[
        str | None,
        typer.Option(
            help=f"Only this model version, or a unique prefix of it (at least "
            f"{MIN_VERSION_PREFIX} characters; logs print 12). Default: all."
        ),
    ] = None,
    decision: Annotated[
        str | None, typer.Option(help="Only this outcome: approve, deny, or a class.")
    ] = None,
    export_format: Annotated[
        ExportFormat, typer.Option("--format", help="jsonl or csv.")
    ] = ExportFormat.JSONL,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
) -> None:
    """Write the decisions of [start, end) with their explanations and a manifest to --out.

    Reads the store directly and records the export in the access log as `cli:<user>`.

    Settings (environment): SHAPSTREAM_MODE, SHAPSTREAM_DATA_DIR, SHAPSTREAM_CASSANDRA_HOSTS,
    SHAPSTREAM_CASSANDRA_KEYSPACE; which store they choose: `shapstream audit --help`.
    """
    since = _moment(start, "--start")
    until = datetime.now(UTC) if end is None else _moment(end, "--end")
    if until <= since:
        raise _refused("--end", "must be after --start")
    _check_out(out, force)
    from service.cli.stores import store_settings

    settings = store_settings()
    started = time.perf_counter()
    target = _Target(out, force)
    rows = asyncio.run(
        _export(settings, since, until, model_version, decision, export_format, target)
    )
    elapsed = time.perf_counter() - started
    rate = rows / elapsed if elapsed else 0
    typer.echo(f"{_rows(rows)} in {elapsed:.1f} s ({rate:,.0f} rows/s) -> {out}")


@audit_app.command("verify")
def verify_command(
    file: Annotated[Path, typer.Argument(help="An export file.", exists=True, dir_okay=False)],
) -> None:
    """Recompute every row's record hash, the chain and the manifest; name what changed."""
    from service.core.export_verify import verify

    report = verify(file)
    if report.ok:
        typer.echo(f"OK: {_rows(report.rows)}, manifest matches")
        return
    for problem in report.problems[:SHOWN_PROBLEMS]:
        typer.echo(str(problem))
    if report.problem_count > SHOWN_PROBLEMS:
        typer.echo(f"... and {report.problem_count - SHOWN_PROBLEMS} more")
    typer.echo(f"FAILED: {report.problem_count} problem(s) in {report.rows} rows", err=True)
    raise typer.Exit(1)


@dataclass(frozen=True, slots=True)
class _Target:
    """Where the export goes, and whether an existing file there may be replaced."""

    path: Path
    force: bool


async def _export(
    settings: Settings,
    start: datetime,
    end: datetime,
    model_version: str | None,
    decision: str | None,
    export_format: ExportFormat,
    target: _Target,
) -> int:
    from service.adapters.wiring import scan_progress
    from service.core.access import AccessEntry, Action
    from service.core.export import (
        AuditExport,
        ExportQuery,
        QueryError,
        access_target,
        scan_versions,
        schemas_from,
        select_versions,
    )

    async with _open_stores(settings) as stores:
        store, access = stores.explanations, stores.access
        schemas = schemas_from(store.get_model)
        try:
            versions = await select_versions(store, schemas, model_version, decision)
        except QueryError as error:
            hint = "--" + error.field.replace("_", "-")
            raise _refused(hint, error.reason) from None
        query = ExportQuery(start, end, versions, decision, export_format)
        chosen = versions[0] if model_version is not None else None
        entry = AccessEntry(
            datetime.now(UTC), _cli_user(), Action.AUDIT_EXPORT, access_target(query, chosen)
        )
        await access.record(entry)
        export = AuditExport(query, schemas)
        records = scan_versions(store, versions, start, end)
        async with aclosing(records):
            scale = scan_progress(settings, versions, start, end)
            await _write(export, records, scale, target)
        return export.rows


async def _write(
    export: "AuditExport",
    records: AsyncIterator["DecisionRecord"],
    scale: "ScanProgress",
    target: _Target,
) -> None:
    """Write the export to the target under a rich progress bar over the scan."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    position, total = scale
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%  {task.fields[rows]:,} records read"),
        TimeElapsedColumn(),
    )
    out = target.path
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
        with _open_private(partial) as handle:
            async for chunk in export.chunks(tracked()):
                try:
                    handle.write(chunk)
                except OSError as error:  # e.g. the disk is full
                    raise _unwritable(partial, error) from None
    _publish(partial, target)


def _open_private(path: Path) -> BinaryIO:
    """`path` truncated for writing, readable by its owner only: it holds applicants' data."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as error:
        raise _unwritable(path, error) from None
    handle = os.fdopen(descriptor, "wb")
    # An earlier `.partial` keeps its mode through O_TRUNC: narrow it too.
    os.fchmod(descriptor, 0o600)
    return handle


def _unwritable(path: Path, error: OSError) -> typer.Exit:
    return _refused("--out", f"cannot write {path}: {error.strerror}")


def _publish(partial: Path, target: _Target) -> None:
    """Give the complete file its name; without --force, never over a file made meanwhile."""
    if target.force:
        partial.replace(target.path)
        return
    try:
        # A hard link fails if the name is taken, atomically (a rename would replace it).
        os.link(partial, target.path)
    except FileExistsError:
        raise _refused(
            "--out", f"{target.path} was created while exporting: the export is in {partial}"
        ) from None
    except OSError:
        # A file system without hard links: check, then rename (a narrow race remains).
        if target.path.exists():
            raise _refused(
                "--out", f"{target.path} was created while exporting: the export is in {partial}"
            ) from None
        partial.replace(target.path)
        return
    partial.unlink()


def _cli_user() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no login name and no passwd entry (some containers)
        return "cli:unknown"


@asynccontextmanager
async def _open_stores(settings: Settings) -> AsyncIterator["Stores"]:
    """The stores of SHAPSTREAM_MODE; in embedded mode only an existing database."""
    from service.adapters.wiring import embedded_store_exists
    from service.cli.stores import using_stores

    if settings.mode != "kafka" and not embedded_store_exists(settings):
        raise _refused("SHAPSTREAM_DATA_DIR", f"no embedded database in {settings.data_dir}")
    async with using_stores(settings) as stores:
        yield stores
