"""`shapstream serve` (Kafka + Cassandra) and `shapstream run` (embedded, one process)."""

import logging
import os
import shlex
import shutil
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from service.cli.preflight import (
    driver_errors_on_one_line,
    fail,
    listening_socket,
    require_data_dir,
    require_models,
    require_servable_models,
    require_servers,
    unreachable,
)
from service.core.keys import DEV_KEY_FILE
from service.settings import Settings

if TYPE_CHECKING:
    import uvicorn
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

Host = Annotated[str, typer.Option(help="Interface to listen on.")]
Port = Annotated[int, typer.Option(help="TCP port to listen on (`make run PORT=...`).")]


# The commands' help: what each does, then the settings it reads that a user would change.
SERVE_HELP = (
    "Start the gateway against Kafka and Cassandra.\n\n"
    "Settings (environment): SHAPSTREAM_KAFKA_BOOTSTRAP, SHAPSTREAM_KAFKA_TOPIC, "
    "SHAPSTREAM_CASSANDRA_HOSTS, SHAPSTREAM_CASSANDRA_KEYSPACE, SHAPSTREAM_MODELS_DIR (default "
    "./models; every model directory there must load, or the gateway does not start), "
    "SHAPSTREAM_DEFAULT_MODEL (the model a request without `model` gets; required when more "
    "than one model is served), SHAPSTREAM_DATA_DIR and SHAPSTREAM_SPOOL_DIR (the "
    "local spool; default $SHAPSTREAM_DATA_DIR/spool), SHAPSTREAM_RETENTION_DAYS, "
    "SHAPSTREAM_LOG_LEVEL; the gateway's bounds (SHAPSTREAM_GATEWAY_*, SHAPSTREAM_SECURITY_*): "
    "README, Configuration."
)
RUN_HELP = (
    "Start everything in one process: gateway, worker, SQLite store, in-process bus.\n\n"
    "Settings (environment): SHAPSTREAM_DATA_DIR (its state: the SQLite store and the "
    "development key; default: your user data directory, e.g. ~/.local/share/shapstream), "
    "SHAPSTREAM_MODELS_DIR (the models served; default ./models; every model directory there "
    "must load), SHAPSTREAM_DEFAULT_MODEL (the model a request without `model` gets; required "
    "when more than one model is served), "
    "SHAPSTREAM_RETENTION_DAYS, SHAPSTREAM_LOG_LEVEL. `shapstream keys` and `shapstream audit "
    "export` act on this state when they see the same SHAPSTREAM_DATA_DIR."
)


def serve(host: Host = "127.0.0.1", port: Port = 8000) -> None:
    """Start the gateway against Kafka and Cassandra (help: `SERVE_HELP`)."""
    settings = Settings(mode="kafka")
    require_models(settings.models_dir)
    require_servers(settings)
    sock = listening_socket(host, port)
    require_servable_models(settings)
    typer.echo(
        f"shapstream gateway: Kafka {settings.kafka.bootstrap}, "
        f"Cassandra {settings.cassandra.hosts}, models {settings.models_dir}"
    )
    typer.echo(f"  API   http://{host}:{port}/v1/predictions (Ctrl+C stops)")
    typer.echo(f"  UI    http://{host}:{port}/ui/ (sign in with an explanations:read key)")
    typer.echo("  keys  shapstream keys create --name NAME --scopes predict,explanations:read")
    _listen(settings, sock)


def run(host: Host = "127.0.0.1", port: Port = 8000) -> None:
    """Start everything in one process (help: `RUN_HELP`)."""
    settings = Settings(mode="embedded")
    require_models(settings.models_dir)
    require_data_dir(settings.data_dir)
    sock = listening_socket(host, port)
    require_servable_models(settings)
    typer.echo(f"shapstream (embedded): state in {settings.data_dir}, models {settings.models_dir}")
    typer.echo(f"  API   http://{host}:{port}/v1/predictions (Ctrl+C stops)")
    typer.echo(f"  docs  http://{host}:{port}/docs")
    typer.echo(f"  UI    http://{host}:{port}/ui/ (sign in with the development key)")
    # The key itself is printed once, by the app when it creates it (service/resources.py).
    key_file = shlex.quote(str(settings.data_dir / DEV_KEY_FILE))
    typer.echo(
        f'  key   curl -H "Authorization: Bearer $(cat {key_file})" http://{host}:{port}/v1/models'
    )
    typer.echo(f"  CLI   {_cli_hint()}")
    _listen(settings, sock)


def _cli_hint() -> str:
    """How to reach this state from another terminal, with `shapstream` on the PATH."""
    command = Path(sys.argv[0]).absolute()
    found = shutil.which("shapstream")
    if found is not None and Path(found).absolute() == command:
        return "shapstream keys list, shapstream audit --help (in another terminal)"
    activate = command.with_name("activate")
    if not activate.is_file():
        return f"{command} keys list (in another terminal)"
    shown = os.path.relpath(activate) if activate.is_relative_to(Path.cwd()) else str(activate)
    return f"source {shlex.quote(shown)}, then shapstream keys list (in another terminal)"


def _listen(settings: Settings, sock: socket.socket) -> None:
    import uvicorn

    from service.app import create_app
    from service.logs import configure_logging

    configure_logging()
    driver_errors_on_one_line()
    app = _StartupReport(create_app(settings), settings)
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_config=None,
        # Not behind a proxy by default; parsing forwarded headers would cost every request.
        proxy_headers=False,
    )
    app.hand_over_to_app(config)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    except SystemExit:
        # uvicorn exits this way when the app's start-up failed.
        if app.failure is not None:
            fail(app.failure)
        raise
    finally:
        sock.close()


class _StartupReport:
    """The app, whose start-up failing to reach Kafka, Cassandra or its store is said in one
    line (`failure`, printed once uvicorn has stopped) instead of uvicorn's logged traceback.

    Other start-up errors are logged by uvicorn with their traceback, as before. Once started,
    requests go to the app itself (`hand_over_to_app`): this wrapper costs them nothing.
    """

    def __init__(self, app: "ASGIApp", settings: Settings) -> None:
        self._app = app
        self._settings = settings
        self._config: uvicorn.Config | None = None
        self.failure: str | None = None

    def hand_over_to_app(self, config: "uvicorn.Config") -> None:
        """Once the start-up is complete, let `config`'s connections call the app directly."""
        self._config = config

    def _started(self) -> None:
        # uvicorn gives each new connection `config.loaded_app`, set before the start-up and
        # read once connections come, after it; it is this wrapper unless uvicorn wrapped it.
        if self._config is not None and self._config.loaded_app is self:
            self._config.loaded_app = self._app

    async def __call__(self, scope: "Scope", receive: "Receive", send: "Send") -> None:
        if scope["type"] != "lifespan":
            await self._app(scope, receive, send)
            return
        held: list[Message] = []

        async def hold_startup_failure(message: "Message") -> None:
            # Starlette sends it (with the traceback) before it re-raises the error.
            if message["type"] == "lifespan.startup.failed":
                held.append(message)
                return
            if message["type"] == "lifespan.startup.complete":
                self._started()
            await send(message)

        try:
            await self._app(scope, receive, hold_startup_failure)
        except BaseException as error:
            if held:
                self.failure = unreachable(error, self._settings)
                if self.failure is not None:
                    log.debug("start-up failed: %s", self.failure, exc_info=error)
                    await send({**held[0], "message": ""})
                else:
                    await send(held[0])
            raise
