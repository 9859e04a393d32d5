"""`shapstream worker`: one explainer process (Kafka consumer group member -> Cassandra)."""

from typing import Annotated

import typer

MetricsPort = Annotated[
    int | None, typer.Option(help="Serve Prometheus metrics on this port (off when omitted).")
]


def worker(metrics_port: MetricsPort = None) -> None:
    """Explain decisions from Kafka into Cassandra until SIGTERM (SHAPSTREAM_* settings)."""
    import asyncio

    from service.cli.preflight import require_servers
    from service.logs import configure_logging
    from service.settings import Settings
    from workers.main import run_worker

    settings = Settings(mode="kafka")
    require_servers(settings)
    configure_logging()
    asyncio.run(run_worker(settings, metrics_port=metrics_port))


def worker_app() -> typer.Typer:
    """The command alone, for `python -m service.cli.worker`."""
    app = typer.Typer(add_completion=False)
    app.command()(worker)
    return app


if __name__ == "__main__":
    worker_app()()
