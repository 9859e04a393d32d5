"""The `shapstream` command."""

import typer


def build_app() -> typer.Typer:
    """Assemble the command tree; sub-commands import their heavy modules only when run."""
    app = typer.Typer(no_args_is_help=True, help="Exact, durable TreeSHAP explanations.")
    return app


def main() -> None:
    build_app()()
