"""The `shapstream` command."""

import typer


def build_app() -> typer.Typer:
    """Assemble the command tree."""
    from service.cli.audit import audit_app
    from service.cli.db import db_app
    from service.cli.keys import keys_app
    from service.cli.model import model_app
    from service.cli.report import report_app
    from service.cli.serve import RUN_HELP, SERVE_HELP, run, serve
    from service.cli.stores import STORE_RULE
    from service.cli.worker import WORKER_HELP, worker

    app = typer.Typer(
        no_args_is_help=True,
        help="Exact, durable TreeSHAP explanations.\n\n"
        "Settings are SHAPSTREAM_* environment variables (README, Configuration); the --help "
        "of each command names those it reads.",
    )
    app.command(help=SERVE_HELP)(serve)
    app.command(help=RUN_HELP)(run)
    app.command(help=WORKER_HELP)(worker)
    app.add_typer(
        model_app,
        name="model",
        help="Model directories: init, train-demo; a version's reference: freeze-reference.",
    )
    app.add_typer(db_app, name="db", help="The Cassandra schema.")
    app.add_typer(keys_app, name="keys")
    app.add_typer(
        audit_app,
        name="audit",
        help="Audit export and verification (verify reads only its file).\n\n"
        f"The store `audit export` reads: {STORE_RULE}",
    )
    app.add_typer(
        report_app,
        name="report",
        help="Population figures of a model version over UTC days, from the stored aggregates: "
        "importance, drift, reasons (as GET /v1/models/NAME/versions/VERSION/...).\n\n"
        f"The store they read: {STORE_RULE}",
    )
    return app


def main() -> None:
    build_app()()
