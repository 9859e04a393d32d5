"""`shapstream worker`: one explainer process (Kafka consumer group member -> Cassandra)."""

from typing import Annotated

import typer

MetricsPort = Annotated[
    int | None,
    typer.Option(
        help="Serve GET /metrics (Prometheus), /healthz (liveness: the consume loop makes "
        "progress) and /readyz (readiness: in its consumer group, no store or dead-letter step "
        "failing) on this port, all interfaces; off when omitted."
    ),
]


WORKER_HELP = (
    "Explain decisions from Kafka into Cassandra until SIGTERM.\n\n"
    "Settings (environment): SHAPSTREAM_KAFKA_BOOTSTRAP, SHAPSTREAM_KAFKA_TOPIC, "
    "SHAPSTREAM_KAFKA_GROUP_ID, SHAPSTREAM_CASSANDRA_HOSTS, SHAPSTREAM_CASSANDRA_KEYSPACE, "
    "SHAPSTREAM_MODELS_DIR (default ./models; versions not there are loaded from the store), "
    "SHAPSTREAM_WORKER_BATCH_MAX, SHAPSTREAM_WORKER_STALL_AFTER_S (liveness fails after this "
    "many seconds without progress; default 120), SHAPSTREAM_LOG_LEVEL."
)


def worker(metrics_port: MetricsPort = None) -> None:
    """Explain decisions from Kafka into Cassandra until SIGTERM (help: `WORKER_HELP`)."""
    import asyncio

    from service.cli.preflight import driver_errors_on_one_line, reported, require_servers
    from service.logs import configure_logging
    from service.settings import Settings
    from workers.main import run_worker
    from workers.probes import PortUnavailable

    settings = Settings(mode="kafka")
    require_servers(settings)
    configure_logging()
    driver_errors_on_one_line()
    try:
        with reported(settings):
            asyncio.run(run_worker(settings, metrics_port=metrics_port))
    except PortUnavailable as exc:
        typer.echo(f"shapstream: {exc}. Choose another --metrics-port.", err=True)
        raise typer.Exit(1) from None


def worker_app() -> typer.Typer:
    """The command alone, for `python -m service.cli.worker`."""
    app = typer.Typer(add_completion=False)
    app.command(help=WORKER_HELP)(worker)
    return app


if __name__ == "__main__":
    worker_app()()
