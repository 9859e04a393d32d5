"""Audit export and verify on the SQLite store: round trips, tampering named by row, the API."""

import asyncio
import hashlib
import random
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from service.adapters.sqlite_access import SqliteAccessStore
from service.adapters.sqlite_store import DB_FILE, SqliteStore
from service.app import create_app
from service.cli import build_app
from service.core.export import (
    FIELDS,
    AuditExport,
    ExportFormat,
    ExportQuery,
    scan_versions,
    schemas_from,
)
from service.core.export_verify import ProblemKind, VerifyReport, verify
from service.core.integrity import sealed
from service.core.records import BinaryPrediction, DecisionRecord, ModelArtifact
from service.core.schema import ModelSchema, Task
from service.settings import Settings
from tests.api_client import (
    MODELS,
    asgi_client,
    bearer,
    dev_key,
    german_rows,
    problem_fields,
)
from tests.store_contract import (
    CLASSES,
    RETENTION,
    binary_record,
    legacy_record,
    multiclass_record,
    with_version,
)

BINARY = "sha256:" + "b" * 64
MULTICLASS = "sha256:" + "c" * 64
START = datetime(2026, 3, 2, tzinfo=UTC)
END = START + timedelta(days=2)
BINARY_ROWS, MULTICLASS_ROWS = 30, 4
# Exports made by the release before records kept the model's format (shapstream-audit/1).
BEFORE_MODEL_FORMAT = Path(__file__).resolve().parents[1] / "data"
Named = set[tuple[int | None, str | None, ProblemKind]]


def german_schema() -> ModelSchema:
    return ModelSchema.model_validate_json((MODELS / "german-credit" / "schema.json").read_bytes())


def artifact(version: str, schema: ModelSchema) -> ModelArtifact:
    return ModelArtifact(
        name=schema.name,
        version=version,
        schema_bytes=schema.model_dump_json().encode(),
        model_bytes=b"{}",
    )


def approved(record: DecisionRecord) -> DecisionRecord:
    """The record as an approval: no adverse-action reasons."""
    prediction = BinaryPrediction(probability=0.2689414213699951, margin=-1.0, decision="approve")
    return sealed(record.model_copy(update={"prediction": prediction, "reasons": []}))


def decisions() -> list[DecisionRecord]:
    """Denials and approvals over two UTC days, and a few multiclass decisions; every fifth
    binary one stored before records kept the model's format."""
    binary = [
        with_version(
            (legacy_record if n % 5 == 0 else binary_record)(
                n, decided_at=START + timedelta(minutes=97 * n)
            ),
            BINARY,
        )
        for n in range(BINARY_ROWS)
    ]
    binary = [approved(r) if n % 2 == 0 else r for n, r in enumerate(binary)]
    multiclass = [
        with_version(
            multiclass_record(n).model_copy(update={"decided_at": START + timedelta(hours=n)}),
            MULTICLASS,
        )
        for n in range(MULTICLASS_ROWS)
    ]
    return binary + multiclass


async def filled_store(data_dir: Path) -> SqliteStore:
    """An embedded store holding `decisions()` and the schemas of their two model versions."""
    opened = await SqliteStore.open(data_dir / DB_FILE, RETENTION)
    await opened.migrate()
    schema = german_schema()
    multiclass = schema.model_copy(
        update={"task": Task.MULTICLASS, "classes": CLASSES, "decision": None}
    )
    await opened.put_model(artifact(BINARY, schema))
    await opened.put_model(artifact(MULTICLASS, multiclass))
    await opened.write(decisions())
    return opened


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await filled_store(tmp_path)
    try:
        yield opened
    finally:
        await opened.close()


async def export_file(
    store: SqliteStore,
    path: Path,
    export_format: ExportFormat = ExportFormat.JSONL,
    versions: tuple[str, ...] | None = None,
    decision: str | None = None,
) -> Path:
    versions = versions or tuple(await store.model_versions())
    query = ExportQuery(START, END, versions, decision, export_format)
    export = AuditExport(query, schemas_from(store.get_model))
    async with aclosing(scan_versions(store, versions, START, END)) as records:
        content = b"".join([chunk async for chunk in export.chunks(records)])
    await asyncio.to_thread(path.write_bytes, content)
    return path


def named(report: VerifyReport) -> Named:
    """The rows the report names, with what it says of them."""
    return {(p.line, p.transaction_id, p.kind) for p in report.problems if p.line is not None}


def txn(line: bytes) -> str:
    """The transaction id of a JSON Lines row."""
    transaction_id: str = orjson.loads(line)["transaction_id"]
    return transaction_id


@pytest.mark.parametrize("export_format", list(ExportFormat))
async def test_an_export_verifies(
    store: SqliteStore, tmp_path: Path, export_format: ExportFormat
) -> None:
    path = await export_file(store, tmp_path / f"audit.{export_format}", export_format)
    report = verify(path)
    assert report.ok, [str(p) for p in report.problems]
    assert report.rows == BINARY_ROWS + MULTICLASS_ROWS
    content, manifest_line = path.read_bytes().rstrip(b"\n").rsplit(b"\n", 1)
    assert report.manifest is not None
    assert report.manifest["rows"] == report.rows
    assert report.manifest["content_sha256"] == hashlib.sha256(content + b"\n").hexdigest()
    if export_format is ExportFormat.CSV:
        assert manifest_line.startswith(b"#manifest {")
        assert content.split(b"\n", 1)[0].decode() == ",".join(FIELDS)
        return
    rows = [orjson.loads(line) for line in content.split(b"\n")]
    assert [list(row) for row in rows] == [list(FIELDS)] * len(rows)
    binary = next(row for row in rows if row["model_version"] == BINARY)
    assert list(binary["attributions"]) == german_schema().feature_names
    provenance = {(row["model_format"], row["framework_version"]) for row in rows}
    assert provenance == {("xgboost", "3.0.2"), (None, None)}
    multiclass = next(row for row in rows if row["model_version"] == MULTICLASS)
    assert list(multiclass["attributions"]) == list(CLASSES)
    assert list(multiclass["base_value"]) == list(CLASSES)


def probability_digit(line: bytes) -> bytes:
    """The first decimal of the probability: still a valid number, now a different one."""
    changed = bytearray(line)
    digit = changed.index(b".", changed.index(b"probability")) + 1
    changed[digit] = ord(str((int(chr(changed[digit])) + 1) % 10))
    return bytes(changed)


def model_format(line: bytes) -> bytes:
    """Another framework named as the one whose model decided."""
    return line.replace(b"xgboost", b"lightgbm", 1)


@pytest.mark.parametrize("change", [probability_digit, model_format], ids=lambda f: f.__name__)
@pytest.mark.parametrize("export_format", list(ExportFormat))
async def test_one_changed_value_is_named(
    store: SqliteStore,
    tmp_path: Path,
    export_format: ExportFormat,
    change: Callable[[bytes], bytes],
) -> None:
    path = await export_file(store, tmp_path / f"audit.{export_format}", export_format)
    lines = path.read_bytes().splitlines(keepends=True)
    target = 7  # 0-based line index: a row in both formats, of a record with its model format
    changed = change(lines[target])
    assert changed != lines[target]
    lines[target] = changed
    path.write_bytes(b"".join(lines))

    report = verify(path)
    assert not report.ok
    assert {(line, kind) for line, _, kind in named(report)} == {(target + 1, ProblemKind.ALTERED)}
    (problem,) = [p for p in report.problems if p.line is not None]
    assert problem.transaction_id is not None
    assert problem.transaction_id in lines[target].decode()


async def test_a_row_without_the_model_format_is_named(store: SqliteStore, tmp_path: Path) -> None:
    """A row made to look like one of the format before, in a file of the format after."""
    path = await export_file(store, tmp_path / "audit.jsonl")
    lines = path.read_bytes().splitlines(keepends=True)
    row = orjson.loads(lines[7])
    del row["model_format"], row["framework_version"]
    lines[7] = orjson.dumps(row) + b"\n"
    path.write_bytes(b"".join(lines))
    assert named(verify(path)) == {(8, row["transaction_id"], ProblemKind.ALTERED)}


@pytest.mark.parametrize("name", ["audit-v1.jsonl", "audit-v1.csv"])
def test_an_export_made_before_the_model_format_still_verifies(name: str, tmp_path: Path) -> None:
    """Rows without model_format and framework_version, record hashes computed without them."""
    report = verify(BEFORE_MODEL_FORMAT / name)
    assert report.ok, [str(p) for p in report.problems]
    assert report.rows == 3
    assert report.manifest is not None
    assert report.manifest["format"] == "shapstream-audit/1"
    # Still checked row by row: a changed byte is named.
    lines = (BEFORE_MODEL_FORMAT / name).read_bytes().splitlines(keepends=True)
    lines[-2] = lines[-2].replace(b"pred_contribs", b"pred_contribz")
    changed = tmp_path / name
    changed.write_bytes(b"".join(lines))
    assert {(line, kind) for line, _, kind in named(verify(changed))} == {
        (len(lines) - 1, ProblemKind.ALTERED)
    }


async def test_a_removed_row_is_named(store: SqliteStore, tmp_path: Path) -> None:
    path = await export_file(store, tmp_path / "audit.jsonl")
    lines = path.read_bytes().splitlines(keepends=True)
    del lines[10]
    path.write_bytes(b"".join(lines))

    report = verify(path)
    # Line 11 now holds the row that followed the removed one.
    assert named(report) == {(11, txn(lines[10]), ProblemKind.REMOVED)}
    assert any("counts 34 rows, the file has 33" in p.detail for p in report.problems)


async def test_an_inserted_copy_is_named(store: SqliteStore, tmp_path: Path) -> None:
    path = await export_file(store, tmp_path / "audit.jsonl")
    lines = path.read_bytes().splitlines(keepends=True)
    # A copy of a genuine row: its own record hash is right, its place in the chain is not.
    lines.insert(11, lines[3])
    path.write_bytes(b"".join(lines))

    report = verify(path)
    assert named(report) == {(12, txn(lines[3]), ProblemKind.INSERTED)}


async def test_a_cut_manifest_or_a_missing_last_row_is_found(
    store: SqliteStore, tmp_path: Path
) -> None:
    path = await export_file(store, tmp_path / "audit.jsonl")
    whole = path.read_bytes()
    path.write_bytes(whole[:-40])
    report = verify(path)
    assert [(p.kind, p.detail) for p in report.problems] == [
        (ProblemKind.MANIFEST, "the last line is a damaged manifest")
    ]

    lines = whole.splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-2] + lines[-1:]))
    report = verify(path)
    assert named(report) == set()
    kinds = {p.kind for p in report.problems}
    assert kinds == {ProblemKind.REMOVED, ProblemKind.MANIFEST}


async def test_filters_by_decision_and_model_version(store: SqliteStore, tmp_path: Path) -> None:
    path = await export_file(store, tmp_path / "approvals.jsonl", decision="approve")
    rows = [orjson.loads(line) for line in path.read_bytes().splitlines()[:-1]]
    assert {row["decision"] for row in rows} == {"approve"}
    assert len(rows) == BINARY_ROWS // 2
    assert verify(path).ok

    path = await export_file(store, tmp_path / "multi.csv", ExportFormat.CSV, (MULTICLASS,))
    report = verify(path)
    assert report.ok
    assert report.rows == MULTICLASS_ROWS
    assert report.manifest is not None
    assert list(report.manifest["models"]) == [MULTICLASS]


async def test_export_over_http(tmp_path: Path) -> None:
    settings = Settings(mode="embedded", data_dir=tmp_path / "data", models_dir=MODELS)
    async with asgi_client(create_app(settings)) as client:
        key = bearer(dev_key(settings.data_dir))
        now = datetime.now(UTC)
        for features in german_rows(5):
            answer = await client.post("/v1/predictions", json={"features": features}, headers=key)
            assert answer.status_code == 200, answer.text
            found = await client.get(
                f"/v1/explanations/{answer.json()['transaction_id']}?wait=10", headers=key
            )
            assert found.status_code == 200, found.text
        window = {
            "start": (now - timedelta(hours=1)).isoformat(),
            "end": (now + timedelta(hours=1)).isoformat(),
            "format": "csv",
        }
        exported = await client.get("/v1/audit/export", params=window, headers=key)
        assert exported.status_code == 200, exported.text
        assert exported.headers["content-type"] == "text/csv; charset=utf-8"
        assert exported.headers["content-disposition"].startswith('attachment; filename="')
        path = tmp_path / "audit.csv"
        path.write_bytes(exported.content)
        report = verify(path)
        assert report.ok, [str(p) for p in report.problems]
        assert report.rows == 5

        log = await client.get("/v1/audit/access-log", headers=key)
        assert [e["action"] for e in log.json()["entries"]].count("audit.export") == 1

        refused = await client.get("/v1/audit/export", params=window)
        assert refused.status_code == 401
        for change, field in [
            ({"end": window["start"]}, "end"),
            ({"start": "2026-03-02T00:00:00"}, "start"),
            ({"start": "0001-01-01T00:00:00+01:00"}, "start"),
            ({"end": (now + timedelta(days=400)).isoformat()}, "end"),
            ({"model_version": "sha256:unknown"}, "model_version"),
            ({"format": "xlsx"}, "format"),
            ({"decision": "bogus"}, "decision"),
        ]:
            bad = await client.get("/v1/audit/export", params={**window, **change}, headers=key)
            assert bad.status_code == 422, bad.text
            assert problem_fields(bad) == {field}


async def test_http_export_names_allowed_decisions_and_takes_a_version_prefix(
    tmp_path: Path,
) -> None:
    settings = Settings(mode="embedded", data_dir=tmp_path / "data", models_dir=MODELS)
    async with asgi_client(create_app(settings)) as client:
        key = bearer(dev_key(settings.data_dir))
        now = datetime.now(UTC)
        answer = await client.post(
            "/v1/predictions", json={"features": german_rows(1)[0]}, headers=key
        )
        assert answer.status_code == 200, answer.text
        version = answer.json()["model"]["version"]
        found = await client.get(
            f"/v1/explanations/{answer.json()['transaction_id']}?wait=10", headers=key
        )
        assert found.status_code == 200, found.text
        window = {
            "start": (now - timedelta(hours=1)).isoformat(),
            "end": (now + timedelta(hours=1)).isoformat(),
        }

        bogus = await client.get(
            "/v1/audit/export", params={**window, "decision": "bogus"}, headers=key
        )
        assert bogus.status_code == 422, bogus.text
        assert bogus.json()["errors"] == [
            {"field": "decision", "reason": "'bogus' is not an outcome; allowed: approve, deny"}
        ]

        # The 12 characters the logs print name the version while no other starts with them.
        prefix = version[:12]
        exported = await client.get(
            "/v1/audit/export", params={**window, "model_version": prefix}, headers=key
        )
        assert exported.status_code == 200, exported.text
        manifest = orjson.loads(exported.content.splitlines()[-1])["manifest"]
        assert manifest["rows"] == 1
        assert manifest["query"]["model_versions"] == [version]
        log = (await client.get("/v1/audit/access-log", headers=key)).json()["entries"]
        assert f"model_version={version}" in log[-1]["target"]

        # Without a range: the last day, as the access log.
        asked = datetime.now(UTC)
        last_day = await client.get("/v1/audit/export", headers=key)
        assert last_day.status_code == 200, last_day.text
        manifest = orjson.loads(last_day.content.splitlines()[-1])["manifest"]
        assert manifest["rows"] == 1
        end = datetime.fromisoformat(manifest["query"]["end"])
        start = datetime.fromisoformat(manifest["query"]["start"])
        assert asked - timedelta(milliseconds=1) <= end <= datetime.now(UTC)
        assert end - start == timedelta(days=1)

        for path in ("/v1/audit/export", "/v1/audit/access-log"):
            for start, end, reason in [
                (now, now, "must be after start"),
                (now - timedelta(days=367), now, "must be at most 366 days after start"),
            ]:
                span = {"start": start.isoformat(), "end": end.isoformat()}
                refused = await client.get(path, params=span, headers=key)
                assert refused.status_code == 422, refused.text
                assert refused.json()["errors"] == [{"field": "end", "reason": reason}]

        # Another stored version sharing those characters makes the prefix ambiguous.
        other = await SqliteStore.open(settings.data_dir / DB_FILE, RETENTION)
        try:
            await other.put_model(artifact(prefix + "0" * 52, german_schema()))
        finally:
            await other.close()
        for given, reason in [
            (prefix, f"{prefix!r} is ambiguous: 2 stored versions start with it"),
            (version[:4], "is too short"),
            ("f" * 12, "no stored model version starts with"),
        ]:
            bad = await client.get(
                "/v1/audit/export", params={**window, "model_version": given}, headers=key
            )
            assert bad.status_code == 422, bad.text
            (error,) = bad.json()["errors"]
            assert error["field"] == "model_version"
            assert reason in error["reason"], error
        full = await client.get(
            "/v1/audit/export", params={**window, "model_version": version}, headers=key
        )
        assert full.status_code == 200, full.text


async def fill(data_dir: Path) -> None:
    store = await filled_store(data_dir)
    await store.close()


def test_the_cli_exports_and_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    asyncio.run(fill(data_dir))
    monkeypatch.setenv("SHAPSTREAM_MODE", "embedded")
    monkeypatch.setenv("SHAPSTREAM_DATA_DIR", str(data_dir))
    cli, runner, path = build_app(), CliRunner(), tmp_path / "audit.csv"
    window = ["--start", START.isoformat(), "--end", END.isoformat()]

    done = runner.invoke(cli, ["audit", "export", *window, "--format", "csv", "--out", str(path)])
    assert done.exit_code == 0, done.output
    assert f"{BINARY_ROWS + MULTICLASS_ROWS} rows in" in done.output
    checked = runner.invoke(cli, ["audit", "verify", str(path)])
    assert checked.exit_code == 0, checked.output
    assert checked.output == f"OK: {BINARY_ROWS + MULTICLASS_ROWS:,} rows, manifest matches\n"

    lines = path.read_bytes().splitlines(keepends=True)
    lines[5] = lines[5].replace(b"pred_contribs", b"pred_contribz")
    path.write_bytes(b"".join(lines))
    failed = runner.invoke(cli, ["audit", "verify", str(path)])
    assert failed.exit_code == 1
    assert failed.output.startswith("line 6 (txn-")
    assert "altered: its content does not match its record hash" in failed.output


def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An embedded data directory holding `decisions()`, named by the environment."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    asyncio.run(fill(data_dir))
    monkeypatch.setenv("SHAPSTREAM_MODE", "embedded")
    monkeypatch.setenv("SHAPSTREAM_DATA_DIR", str(data_dir))
    return data_dir


def access_entries(data_dir: Path) -> list[str]:
    """The targets of the access log's entries."""

    async def read() -> list[str]:
        store = await SqliteStore.open(data_dir / DB_FILE, RETENTION)
        try:
            access = SqliteAccessStore(store)
            await access.migrate()
            entries = await access.entries(START - timedelta(days=3650), datetime.now(UTC), 100)
            return [e.target for e in entries]
        finally:
            await store.close()

    return asyncio.run(read())


def test_the_cli_refuses_an_out_it_cannot_or_must_not_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = cli_env(tmp_path, monkeypatch)
    cli, runner = build_app(), CliRunner()
    window = ["--start", START.isoformat(), "--end", END.isoformat()]

    missing = tmp_path / "no" / "such" / "folder" / "audit.jsonl"
    refused = runner.invoke(cli, ["audit", "export", *window, "--out", str(missing)])
    assert refused.exit_code == 2, refused.output
    assert refused.exception is None or isinstance(refused.exception, SystemExit)
    assert "Traceback" not in refused.output
    assert f"the folder {missing.parent} does not exist" in refused.output
    assert "mkdir -p" in refused.output
    assert not missing.parent.exists()
    # Refused before anything was read: no export in the access log.
    assert access_entries(data_dir) == []

    existing = tmp_path / "audit.jsonl"
    existing.write_bytes(b"an earlier export\n")
    refused = runner.invoke(cli, ["audit", "export", *window, "--out", str(existing)])
    assert refused.exit_code == 2, refused.output
    assert "exists" in refused.output
    assert "--force" in refused.output
    assert existing.read_bytes() == b"an earlier export\n"
    assert access_entries(data_dir) == []

    forced = runner.invoke(cli, ["audit", "export", *window, "--out", str(existing), "--force"])
    assert forced.exit_code == 0, forced.output
    assert verify(existing).rows == BINARY_ROWS + MULTICLASS_ROWS
    # Applicants' data: readable by its owner only.
    assert stat.S_IMODE(existing.stat().st_mode) == 0o600
    assert not existing.with_name("audit.jsonl.partial").exists()


def test_the_cli_takes_a_date_as_midnight_utc_and_refuses_a_time_without_zone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli_env(tmp_path, monkeypatch)
    cli, runner, path = build_app(), CliRunner(), tmp_path / "audit.jsonl"
    dates = ["--start", START.date().isoformat(), "--end", END.date().isoformat()]
    done = runner.invoke(cli, ["audit", "export", *dates, "--out", str(path)])
    assert done.exit_code == 0, done.output
    report = verify(path)
    assert report.ok
    assert report.rows == BINARY_ROWS + MULTICLASS_ROWS
    assert report.manifest is not None
    assert report.manifest["query"]["start"] == "2026-03-02T00:00:00.000Z"
    assert report.manifest["query"]["end"] == "2026-03-04T00:00:00.000Z"

    # Without --end: until now, which is after every stored decision.
    until_now, asked = tmp_path / "until-now.jsonl", datetime.now(UTC)
    done = runner.invoke(cli, ["audit", "export", *dates[:2], "--out", str(until_now)])
    assert done.exit_code == 0, done.output
    report = verify(until_now)
    assert report.rows == BINARY_ROWS + MULTICLASS_ROWS
    assert report.manifest is not None
    end = datetime.fromisoformat(report.manifest["query"]["end"])
    assert asked - timedelta(milliseconds=1) <= end <= datetime.now(UTC)

    naive = ["--start", "2026-03-02T08:30", "--end", END.isoformat()]
    refused = runner.invoke(cli, ["audit", "export", *naive, "--out", str(tmp_path / "x")])
    assert refused.exit_code == 2, refused.output
    assert "'2026-03-02T08:30' has no time zone" in refused.output
    assert "2026-03-02T08:30:00Z" in refused.output


def test_the_cli_takes_a_unique_version_prefix_and_checks_the_decision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = cli_env(tmp_path, monkeypatch)
    cli, runner, path = build_app(), CliRunner(), tmp_path / "audit.csv"
    window = ["--start", START.isoformat(), "--end", END.isoformat(), "--out", str(path)]

    prefix = BINARY[:12]
    done = runner.invoke(
        cli, ["audit", "export", *window, "--model-version", prefix, "--decision", "deny"]
    )
    assert done.exit_code == 0, done.output
    report = verify(path)
    assert report.ok
    assert report.rows == BINARY_ROWS // 2
    assert report.manifest is not None
    assert report.manifest["query"]["model_versions"] == [BINARY]
    assert access_entries(data_dir) == [
        f"{START:%Y-%m-%dT%H:%M:%S.000Z}/{END:%Y-%m-%dT%H:%M:%S.000Z} model_version={BINARY} "
        "decision=deny format=jsonl"
    ]

    for arguments, wanted in [
        (["--model-version", "sha256:"], "too short"),
        (["--model-version", "sha256:d"], "no stored model version starts with 'sha256:d'"),
        (["--decision", "bogus"], "allowed: approve, deny, high, low, medium"),
        (["--model-version", prefix, "--decision", "high"], "allowed: approve, deny"),
    ]:
        path.unlink(missing_ok=True)
        refused = runner.invoke(cli, ["audit", "export", *window, *arguments])
        assert refused.exit_code == 2, refused.output
        assert wanted in refused.output, refused.output
        assert not path.exists()

    asyncio.run(put_models(data_dir, [artifact(prefix + "0" * 52, german_schema())]))
    ambiguous = runner.invoke(cli, ["audit", "export", *window, "--model-version", prefix])
    assert ambiguous.exit_code == 2, ambiguous.output
    assert "is ambiguous: 2 stored versions start with it" in ambiguous.output


async def put_models(data_dir: Path, artifacts: list[ModelArtifact]) -> None:
    store = await SqliteStore.open(data_dir / DB_FILE, RETENTION)
    try:
        for each in artifacts:
            await store.put_model(each)
    finally:
        await store.close()


def swap(lines: list[bytes], first: int, second: int) -> list[bytes]:
    """`lines` with two 0-based lines exchanged."""
    swapped = list(lines)
    swapped[first], swapped[second] = swapped[second], swapped[first]
    return swapped


async def test_swapped_and_moved_rows_are_named_as_moved(
    store: SqliteStore, tmp_path: Path
) -> None:
    path = await export_file(store, tmp_path / "audit.jsonl")
    lines = path.read_bytes().splitlines(keepends=True)

    # Two neighbours swapped: the first of them is out of place, nothing is missing or extra.
    path.write_bytes(b"".join(swap(lines, 10, 11)))
    report = verify(path)
    assert named(report) == {(11, txn(lines[11]), ProblemKind.MOVED)}
    (moved,) = [p for p in report.problems if p.line is not None]
    assert (
        str(moved)
        == f"line 11 ({txn(lines[11])}): moved: swapped with line 12: it belongs after it"
    )

    # Two rows apart: each is in the other's place.
    path.write_bytes(b"".join(swap(lines, 10, 14)))
    report = verify(path)
    assert named(report) == {
        (11, txn(lines[14]), ProblemKind.MOVED),
        (15, txn(lines[10]), ProblemKind.MOVED),
    }
    details = {p.line: p.detail for p in report.problems if p.line is not None}
    assert details == {
        11: "it belongs between line 14 and line 16, where line 15 is",
        15: "it belongs between line 10 and line 12, where line 11 is",
    }

    # One row taken further down, and the last two rows swapped.
    moved_down = list(lines[:-1])
    moved_down.insert(20, moved_down.pop(4))
    path.write_bytes(b"".join([*moved_down, lines[-1]]))
    assert {(p.line, p.detail) for p in verify(path).problems if p.line is not None} == {
        (21, "it belongs between line 4 and line 5")
    }
    path.write_bytes(b"".join(swap(lines, -3, -2)))
    report = verify(path)
    assert [(p.line, p.kind) for p in report.problems if p.line is not None] == [
        (len(lines) - 2, ProblemKind.MOVED)
    ]


async def test_any_single_moved_row_is_named_with_where_it_belongs(
    store: SqliteStore, tmp_path: Path
) -> None:
    path = await export_file(store, tmp_path / "audit.jsonl")
    lines = path.read_bytes().splitlines(keepends=True)
    rows, manifest = lines[:-1], lines[-1]
    pairs = random.Random(9).sample(
        [(a, b) for a in range(len(rows)) for b in range(len(rows)) if a != b], 60
    )
    for source, destination in pairs:
        moved = list(rows)
        moved.insert(destination, moved.pop(source))
        path.write_bytes(b"".join([*moved, manifest]))
        named_rows = [p for p in verify(path).problems if p.line is not None]
        # One problem, naming the moved row; nothing said of the rows it passed. A row moved
        # by one is a swap of two neighbours: the first of them is named.
        line = min(source, destination) + 1 if abs(source - destination) == 1 else destination + 1
        assert [(p.line, p.kind) for p in named_rows] == [(line, ProblemKind.MOVED)], (
            source,
            destination,
            [str(p) for p in named_rows],
        )
        assert named_rows[0].transaction_id == txn(moved[line - 1])
