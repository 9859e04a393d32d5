"""`shapstream serve` (Kafka + Cassandra) and `shapstream run` (embedded, one process)."""

import shlex
from typing import Annotated

import typer

from service.cli.preflight import require_models, require_servers
from service.core.keys import DEV_KEY_FILE
from service.settings import Settings

Host = Annotated[str, typer.Option(help="Interface to listen on.")]
Port = Annotated[int, typer.Option(help="TCP port to listen on.")]


def serve(host: Host = "127.0.0.1", port: Port = 8000) -> None:
    """Start the gateway against Kafka and Cassandra (SHAPSTREAM_KAFKA_BOOTSTRAP, ..._HOSTS)."""
    settings = Settings(mode="kafka")
    require_models(settings.models_dir)
    require_servers(settings)
    typer.echo(
        f"shapstream gateway: Kafka {settings.kafka.bootstrap}, "
        f"Cassandra {settings.cassandra.hosts}, models {settings.models_dir}"
    )
    typer.echo("  API keys: shapstream keys create --name NAME --scopes predict,explanations:read")
    _listen(settings, host, port)


def run(host: Host = "127.0.0.1", port: Port = 8000) -> None:
    """Start everything in one process: gateway, worker, SQLite store, in-process bus."""
    settings = Settings(mode="embedded")
    require_models(settings.models_dir)
    typer.echo(f"shapstream (embedded): state in {settings.data_dir}, models {settings.models_dir}")
    typer.echo(f"  API   http://{host}:{port}/v1/predictions")
    typer.echo(f"  docs  http://{host}:{port}/docs")
    # The key itself is printed once, by the app when it creates it (service/resources.py).
    key_file = shlex.quote(str(settings.data_dir / DEV_KEY_FILE))
    typer.echo(
        f'  key   curl -H "Authorization: Bearer $(cat {key_file})" http://{host}:{port}/v1/models'
    )
    _listen(settings, host, port)


def _listen(settings: Settings, host: str, port: int) -> None:
    import uvicorn

    from service.app import create_app
    from service.logs import configure_logging

    configure_logging()
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_config=None,
        # Not behind a proxy by default; parsing forwarded headers would cost every request.
        proxy_headers=False,
    )
