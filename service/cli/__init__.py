"""The `shapstream` command."""

import typer


def build_app() -> typer.Typer:
    """Assemble the command tree."""
    from service.benchmarks.cli import bench_app
    from service.cli.audit import audit_app
    from service.cli.db import db_app
    from service.cli.keys import keys_app
    from service.cli.model import model_app
    from service.cli.serve import run, serve
    from service.cli.worker import worker

    app = typer.Typer(no_args_is_help=True, help="Exact, durable TreeSHAP explanations.")
    app.command()(serve)
    app.command()(run)
    app.command()(worker)
    app.add_typer(model_app, name="model", help="Model directories: init, train-demo.")
    app.add_typer(db_app, name="db", help="The Cassandra schema.")
    app.add_typer(keys_app, name="keys", help="API keys: create, list, revoke.")
    app.add_typer(audit_app, name="audit", help="Audit export and verification.")
    app.add_typer(bench_app, name="bench", help="Benchmarks.")
    return app


def main() -> None:
    build_app()()
