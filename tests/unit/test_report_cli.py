"""`shapstream report importance|drift|reasons` and `shapstream model freeze-reference` on the
embedded store: the figures the HTTP API answers, printed and as its JSON; refusals as one line
(exit 1); a reference frozen from production days once, and drift against it afterwards."""

import asyncio
import re
import shutil
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from typer.testing import CliRunner, Result

from service.adapters.sqlite_population import SqlitePopulationStore
from service.adapters.sqlite_store import SqliteStore
from service.cli import build_app
from service.core.explain import explain_batch
from service.core.population import report
from service.core.population.aggregates import Aggregate, Edges, merge_all
from service.core.population.reference import REFERENCE_FILE, Reference, freeze
from service.core.ports import AggregatePart
from service.core.records import DecisionEvent, DecisionRecord, ModelRef
from service.core.registry import LoadedModel
from service.settings import Settings
from tests.api_client import MODELS, embedded_client, german_rows
from tests.polling import until
from workers.explainer import choose_engine

GERMAN = "german-credit"
LIGHTGBM = "german-credit-lightgbm"
DECISIONS = 40
WAIT_S = 30.0
# What a command says on stderr before its work: the store, and the version it chose.
INFORMED = r"shapstream: (using .*|\S+ version [0-9a-f]{64}, the one .* serves)"


def window() -> tuple[date, date]:
    """Yesterday to tomorrow (UTC): today's decisions, whenever the test runs."""
    today = datetime.now(UTC).date()
    return today - timedelta(days=1), today + timedelta(days=1)


def days_args() -> list[str]:
    start, end = window()
    return ["--start", start.isoformat(), "--end", end.isoformat()]


def days_query() -> dict[str, str]:
    start, end = window()
    return {"start": start.isoformat(), "end": end.isoformat()}


def cli(args: Sequence[str], data_dir: Path, models_dir: Path = MODELS) -> Result:
    """The command as a user runs it next to `make run`'s store, on a wide plain terminal."""
    env: Mapping[str, str | None] = {
        "SHAPSTREAM_MODE": "embedded",
        "SHAPSTREAM_DATA_DIR": str(data_dir),
        "SHAPSTREAM_MODELS_DIR": str(models_dir),
        "COLUMNS": "200",
        "NO_COLOR": "1",
        "FORCE_COLOR": None,
    }
    return CliRunner().invoke(build_app(), list(args), env=env)


async def run(args: Sequence[str], data_dir: Path, models_dir: Path = MODELS) -> Result:
    # In a thread: the command runs its own event loop.
    return await asyncio.to_thread(cli, args, data_dir, models_dir)


def succeeded(done: Result) -> str:
    assert done.exit_code == 0, done.output
    return done.stdout


def refused(done: Result, code: int = 1) -> str:
    """The one line a refused command ends with (after those naming the store and version)."""
    assert done.exit_code == code, done.output
    assert done.stdout == ""
    assert "Traceback" not in done.output
    lines = done.stderr.strip().splitlines()
    said = [line for line in lines[:-1] if not re.fullmatch(INFORMED, line)]
    assert said == [], lines
    return lines[-1]


def json_of(done: Result) -> Any:
    return orjson.loads(succeeded(done))


async def decide(client: httpx.AsyncClient, count: int, model: str | None = None) -> str:
    """`count` decisions of the German credit applicants; the version that took them."""
    version = ""
    for n, row in enumerate(german_rows(count)):
        body: dict[str, Any] = {
            "features": row,
            "transaction_id": f"report-{model or 'default'}-{n}",
        }
        if model is not None:
            body["model"] = model
        answer = await client.post("/v1/predictions", json=body)
        assert answer.status_code == 200, answer.text
        version = answer.json()["model"]["version"]
    return version


async def counted(client: httpx.AsyncClient, name: str, version: str, count: int) -> None:
    """Wait until the worker has kept `count` decisions of the version in its aggregates."""

    async def kept() -> bool:
        answer = await client.get(f"{path(name, version)}/reasons", params=days_query())
        return bool(answer.json()["decisions"] == count)

    await until(kept, WAIT_S)


def path(name: str, version: str) -> str:
    return f"/v1/models/{name}/versions/{version}"


async def api(client: httpx.AsyncClient, name: str, version: str, figure: str) -> Any:
    answer = await client.get(f"{path(name, version)}/{figure}", params=days_query())
    assert answer.status_code == 200, answer.text
    return answer.json()


def models_without_reference(tmp_path: Path) -> Path:
    """A models directory serving the demo model without its reference file."""
    models = tmp_path / "models"
    shutil.copytree(MODELS / GERMAN, models / GERMAN, ignore=shutil.ignore_patterns(REFERENCE_FILE))
    assert not (models / GERMAN / REFERENCE_FILE).exists()
    return models


async def stored_days(data_dir: Path, version: str) -> tuple[dict[date, Aggregate], bytes | None]:
    """The version's aggregates of the window's days and its stored reference, read directly."""
    store = await SqliteStore.from_settings(Settings(mode="embedded", data_dir=data_dir))
    try:
        population = SqlitePopulationStore(store)
        start, end = window()
        days = await report.daily(population, version, report.days_between(start, end))
        return days, await population.get_reference(version)
    finally:
        await store.close()


# The figures, printed and as JSON ---------------------------------------------------------------


async def test_the_figures_are_the_apis(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with embedded_client(data_dir) as client:
        version = await decide(client, DECISIONS)
        await counted(client, GERMAN, version, DECISIONS)
        which = ["--model", GERMAN, "--version", version, *days_args()]

        importance = await api(client, GERMAN, version, "importance")
        done = await run(["report", "importance", *which, "--json"], data_dir)
        assert json_of(done) == importance
        printed = succeeded(await run(["report", "importance", *which], data_dir))
        top = importance["outputs"][0]["features"][0]
        assert importance["decisions"] == DECISIONS
        line = next(line for line in printed.splitlines() if line.split()[:1] == [top["feature"]])
        assert line.split()[1:] == [
            f"{top['mean_abs']:.4f}",
            f"{top['reference_mean_abs']:.4f}",
            f"{top['mean']:.4f}",
            f"{top['std']:.4f}",
        ]
        assert f"{GERMAN} version {version}" in printed
        assert f"{DECISIONS} decisions" in printed
        assert importance["reference"]["source"] in printed

        drift = await api(client, GERMAN, version, "drift")
        assert json_of(await run(["report", "drift", *which, "--json"], data_dir)) == drift
        printed = succeeded(await run(["report", "drift", *which], data_dir))
        feature = drift["total"]["outputs"][0]["features"][0]
        inputs = {i["feature"]: i["psi"] for i in drift["total"]["inputs"]}
        line = next(
            line for line in printed.splitlines() if line.split()[:1] == [feature["feature"]]
        )
        assert line.split()[1:] == [
            f"{feature['n_current']:,}",
            f"{feature['psi']:.4f}",
            f"{feature['js']:.4f}",
            f"{feature['ks']:.4f}",
            f"{feature['ks_p_value']:.3g}",
            "DRIFTING" if feature["drifting"] else "no",
            f"{inputs[feature['feature']]:.4f}",
        ]
        ndcg = drift["total"]["outputs"][0]["ndcg"]
        assert f"nDCG of the importance ranking: {ndcg:.4f}" in printed
        assert drift["rule"]["statement"] in " ".join(printed.split())
        today = drift["days"][0]["day"]
        assert today not in printed
        every_day = succeeded(await run(["report", "drift", *which, "--all-days"], data_dir))
        assert f"{today} ({DECISIONS} decisions), attribution drift" in every_day
        assert f"{today} ({DECISIONS} decisions), drifting: none" in every_day

        reasons = await api(client, GERMAN, version, "reasons")
        assert json_of(await run(["report", "reasons", *which, "--json"], data_dir)) == reasons
        printed = succeeded(await run(["report", "reasons", *which], data_dir))
        assert reasons["decisions"] == DECISIONS
        assert 0 < reasons["denials"] < DECISIONS
        day = reasons["days"][0]
        row = next(line for line in printed.splitlines() if line.split()[:1] == [day["day"]])
        assert row.split()[1] == str(DECISIONS)
        assert f"deny {day['outcomes']['deny']}" in row
        family, count = max(day["families"].items(), key=lambda item: (item[1], item[0]))
        assert f"{family} {count} ({count / day['denials']:.0%})" in " ".join(printed.split())


async def test_the_defaults_are_the_served_version_and_the_last_seven_days(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    async with embedded_client(data_dir) as client:
        version = await decide(client, 3)
        await counted(client, GERMAN, version, 3)
        done = await run(["report", "reasons", "--model", GERMAN, "--json"], data_dir)
        body = json_of(done)
        assert body["model"] == {"name": GERMAN, "version": version}
        today = datetime.now(UTC).date()
        assert body["window"] == {
            "start": (today - timedelta(days=6)).isoformat(),
            "end": today.isoformat(),
        }
        assert body["decisions"] == 3
        assert f"shapstream: {GERMAN} version {version}, the one {MODELS} serves" in done.stderr
        assert "using the embedded store in" in done.stderr

        # A prefix of the version is enough; the API's default window is the same.
        short = ["--model", GERMAN, "--version", version[:12], "--json"]
        answer = await client.get(f"{path(GERMAN, version)}/reasons")
        assert json_of(await run(["report", "reasons", *short], data_dir)) == answer.json()


async def test_refusals_are_one_line(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    missing = await run(["report", "importance", "--model", GERMAN], data_dir)
    said = refused(missing)
    assert said.startswith(f"shapstream: No embedded store in {data_dir}")

    async with embedded_client(data_dir) as client:
        version = await decide(client, 2)
        await counted(client, GERMAN, version, 2)

    # Both shipped models are stored (the gateway stores every version it serves).
    said = refused(await run(["report", "importance"], data_dir))
    assert said == (
        f"shapstream: 2 models are stored: name one with --model ({GERMAN}, {LIGHTGBM})."
    )
    said = refused(await run(["report", "drift", "--model", "no-such-model"], data_dir))
    assert said == (
        f"shapstream: No model named 'no-such-model' is stored (stored: {GERMAN}, {LIGHTGBM})."
    )
    unknown = ["--model", GERMAN, "--version", "f" * 64]
    said = refused(await run(["report", "reasons", *unknown], data_dir))
    assert said.startswith(f"shapstream: Model '{GERMAN}': no stored model version starts with")
    assert version[:12] in said
    # A version of another model is not one of this model's.
    lightgbm = LoadedModel.from_directory(MODELS / LIGHTGBM).version
    said = refused(
        await run(["report", "reasons", "--model", GERMAN, "--version", lightgbm], data_dir)
    )
    assert "no stored model version starts with" in said

    # Options: a usage error (exit 2), before any store is opened.
    said = refused(await run(["report", "reasons", "--start", "yesterday"], data_dir), code=2)
    assert said == "shapstream: --start: not a date (YYYY-MM-DD): 'yesterday'"
    backwards = ["--start", "2026-03-02", "--end", "2026-03-01"]
    said = refused(await run(["report", "reasons", *backwards], data_dir), code=2)
    assert said == "shapstream: --start: 2026-03-02 is after --end 2026-03-01"
    long = ["--start", "2025-01-01", "--end", "2026-03-01"]
    said = refused(await run(["report", "reasons", *long], data_dir), code=2)
    assert said.startswith("shapstream: --start: at most 366 days")

    # The shipped demo has its reference: freezing another is refused, the reference kept.
    freeze_args = ["model", "freeze-reference", GERMAN, version, *days_args()]
    said = refused(await run([*freeze_args, "--min-decisions", "1"], data_dir))
    assert said.startswith(f"shapstream: {GERMAN} version {version} already has a reference (")
    assert said.endswith("a version's reference never changes.")


# A version without a reference, and freezing one -----------------------------------------------


async def test_a_reference_frozen_from_production_days(tmp_path: Path) -> None:
    data_dir, models = tmp_path / "data", models_without_reference(tmp_path)
    start, end = window()
    async with embedded_client(data_dir, models_dir=models) as client:
        version = await decide(client, DECISIONS)
        await counted(client, GERMAN, version, DECISIONS)
        assert (await client.get(f"{path(GERMAN, version)}/drift")).status_code == 404

        # Drift needs a reference, and says how to make one.
        said = refused(await run(["report", "drift", "--model", GERMAN], data_dir, models))
        assert said.startswith(f"shapstream: Model '{GERMAN}' version {version} has no reference")
        assert f"shapstream model freeze-reference {GERMAN} {version[:12]}" in said
        # Importance has no reference column then, and the only model needs no --model.
        importance = json_of(await run(["report", "importance", "--json"], data_dir, models))
        assert importance["reference"] is None
        assert importance["decisions"] == DECISIONS
        printed = succeeded(await run(["report", "importance"], data_dir, models))
        assert "reference: none" in printed

        freeze_args = ["model", "freeze-reference", GERMAN, version[:12], *days_args()]
        said = refused(await run(freeze_args, data_dir, models))
        assert said == (
            f"shapstream: {GERMAN} version {version} has {DECISIONS} decisions from {start} to "
            f"{end}; a reference needs at least 500 (--min-decisions): choose more days."
        )
        small = [*freeze_args, "--min-decisions", str(DECISIONS)]
        done = await run(small, data_dir, models)
        source = f"production days {start} to {end} ({DECISIONS} decisions)"
        assert succeeded(done) == f"reference of {GERMAN} version {version}: {source}\n"

        days, stored = await stored_days(data_dir, version)
        assert stored is not None
        reference = Reference.from_bytes(stored)
        assert reference.source == source
        total = merge_all(days.values())
        assert total is not None
        assert total.count == DECISIONS
        assert reference.aggregate.to_bytes() == total.to_bytes()
        schema = LoadedModel.from_directory(models / GERMAN).schema
        assert reference.edges.fingerprint == Edges.default(schema).fingerprint

        said = refused(await run(small, data_dir, models))
        assert said == (
            f"shapstream: {GERMAN} version {version} already has a reference ({source}); a "
            "version's reference never changes."
        )
        _, again = await stored_days(data_dir, version)
        assert again == stored

        # Drift against it: the same days, so nothing moved.
        answer = await client.get(f"{path(GERMAN, version)}/drift", params=days_query())
        assert answer.status_code == 200, answer.text
        drift = answer.json()
        assert drift["reference"] == {"source": source, "decisions": DECISIONS}
        assert drift["total"]["drifting"] == []
        assert drift["total"]["outputs"][0]["ndcg"] == pytest.approx(1.0)
        assert {f["psi"] for f in drift["total"]["outputs"][0]["features"]} == {0.0}
        which = ["--model", GERMAN, *days_args()]
        assert json_of(await run(["report", "drift", *which, "--json"], data_dir, models)) == drift
        printed = succeeded(await run(["report", "drift", *which], data_dir, models))
        assert f"reference: {source}" in printed
        assert "drifting: none" in printed


async def test_days_kept_on_other_edges_are_not_frozen(tmp_path: Path) -> None:
    model = LoadedModel.from_directory(MODELS / GERMAN)
    assert model.reference is not None
    shipped = Reference.from_bytes(model.reference)
    data_dir, day = tmp_path / "data", date(2026, 3, 2)
    store = await SqliteStore.from_settings(Settings(mode="embedded", data_dir=data_dir))
    try:
        await store.migrate()
        await store.put_model(model.artifact())
        population = SqlitePopulationStore(store)
        await population.migrate()
        # Kept while the version had its reference's edges (in a store that no longer has it).
        aggregate = shipped.aggregate
        await population.put_parts(
            [AggregatePart(model.version, day, "outbox", 1, aggregate.to_bytes())]
        )
    finally:
        await store.close()
    args = ["model", "freeze-reference", GERMAN, model.version, "--start", str(day)]
    said = refused(await run([*args, "--end", str(day), "--min-decisions", "1"], data_dir))
    assert said == (
        f"shapstream: The aggregates of {GERMAN} version {model.version} on {day} were not binned "
        "on the default edges (the version had a reference when they were kept): they cannot be "
        "frozen."
    )


def explained(model: LoadedModel, rows: list[dict[str, Any]]) -> list[DecisionRecord]:
    """Decisions of `rows` today, explained as a worker does."""
    now = datetime.now(UTC)
    events = [
        DecisionEvent(
            transaction_id=f"freeze-{n}",
            model=ModelRef(name=model.name, version=model.version),
            features=row,
            prediction=model.predict(row),
            decided_at=now,
        )
        for n, row in enumerate(rows)
    ]
    engine, _ = choose_engine(model, "auto")
    result = explain_batch(model, engine, events, now)
    assert not result.failures
    return result.records


def test_freeze_keeps_the_default_edges() -> None:
    model = LoadedModel.from_directory(MODELS / GERMAN)
    schema, default = model.schema, Edges.default(model.schema)
    records = explained(model, german_rows(12))
    days = [Aggregate.of_records(records[:5], schema, default)]
    days.append(Aggregate.of_records(records[5:], schema, default))
    total = merge_all(days)
    assert total is not None
    source = "production days 2026-03-01 to 2026-03-02 (12 decisions)"
    frozen = freeze(total, schema, source)
    assert frozen.edges.fingerprint == default.fingerprint
    assert frozen.source == source
    assert frozen.aggregate is total
    assert Reference.from_bytes(frozen.to_bytes()).aggregate.to_bytes() == total.to_bytes()

    assert model.reference is not None
    shipped = Reference.from_bytes(model.reference)
    with pytest.raises(ValueError, match="default edges"):
        freeze(shipped.aggregate, schema, "the hold-out")
    with pytest.raises(ValueError, match="at least one decision"):
        freeze(Aggregate.empty(schema, default), schema, "nothing")
