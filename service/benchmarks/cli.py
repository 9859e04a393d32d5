"""`shapstream bench ...` commands (`bench_app` is registered under the shapstream CLI)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from service.benchmarks.engine import single_thread

bench_app = typer.Typer(help="Benchmarks.", no_args_is_help=True, add_completion=False)


@bench_app.callback()
def _bench() -> None:
    """Benchmarks (one thread per engine)."""


@bench_app.command("engine")
def engine(
    model: Annotated[Path, typer.Option("--model", help="XGBoost model file (.json/.ubj).")],
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Rows as .csv or .npy; default: synthetic with missing."),
    ] = None,
    rows: Annotated[int, typer.Option("--rows", min=1, help="Rows to draw batches from.")] = 2048,
    batches: Annotated[
        str, typer.Option("--batches", help="Comma-separated batch sizes.")
    ] = "1,64,1024",
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Repeats per batch.")] = 5,
    single_repeats: Annotated[
        int, typer.Option("--single-repeats", min=1, help="Repeats for batch 1.")
    ] = 25,
    budget: Annotated[
        float, typer.Option("--budget", help="Seconds per batch size after 3 repeats.")
    ] = 120.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Time pred_contribs, shapstream and every other installed TreeSHAP engine."""
    single_thread()
    from service.benchmarks.engine import load_rows, run_bench, stderr, synthetic_rows

    if not model.exists():
        raise typer.BadParameter(f"{model} does not exist", param_hint="--model")
    sizes = [int(b) for b in batches.split(",") if b.strip()]
    if not sizes or min(sizes) < 1:
        raise typer.BadParameter("batch sizes must be positive", param_hint="--batches")
    import xgboost as xgb

    n_features = xgb.Booster(model_file=str(model)).num_features()
    if data is not None:
        x = load_rows(data, n_features)[:rows]
    else:
        x = synthetic_rows(max(rows, max(sizes)), n_features)
    report = run_bench(
        model,
        rows=x,
        batches=sizes,
        repeats=repeats,
        single_row_repeats=single_repeats,
        budget_s=budget,
        progress=stderr,
    )
    if as_json:
        typer.echo(json.dumps(report.as_json()))
    else:
        typer.echo(report.table())


if __name__ == "__main__":
    bench_app()
