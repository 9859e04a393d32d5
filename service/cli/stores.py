"""The stores a command-line tool works on: the mode chosen by one rule (`STORE_RULE`), the
stores of that mode opened by `service.adapters.wiring`, schema ensured."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import typer

from service.adapters.wiring import Stores, describe_stores, embedded_store_exists
from service.settings import Settings

# Said in the help of every command that reads or writes the stores, and in the README.
STORE_RULE: Final = (
    "Which store: SHAPSTREAM_MODE (kafka: Cassandra; embedded: the SQLite file of `shapstream "
    "run`) when set; else Cassandra when any SHAPSTREAM_CASSANDRA_* is set; else the embedded "
    "store when SHAPSTREAM_DATA_DIR holds one (as after `make run`); else Cassandra. "
    "The command names the store it uses on stderr."
)


def store_settings() -> Settings:
    """Settings whose `mode` follows `STORE_RULE`: what is configured, else what exists here.

    A server started with `make run` (`shapstream run`) keeps its state in SHAPSTREAM_DATA_DIR;
    a command run next to it acts on that state without being told. Nothing is guessed when a
    store is named (SHAPSTREAM_MODE, or Cassandra settings), and a missing embedded database
    is never created by the guess: then the command goes to Cassandra, the production default,
    and says what to do if Cassandra does not answer.
    """
    settings = Settings()
    if {"mode", "cassandra"} & settings.model_fields_set:
        return settings
    if embedded_store_exists(settings):
        return settings.model_copy(update={"mode": "embedded"})
    return settings


@asynccontextmanager
async def using_stores(settings: Settings) -> AsyncIterator[Stores]:
    """Cassandra (kafka mode) or the embedded SQLite file, with the access log on its connection.

    Says which on stderr; a store that cannot be reached, before or during the work, ends the
    command with one line saying what to do (exit 1).
    """
    from service.adapters.wiring import open_stores
    from service.cli.preflight import reported

    typer.echo(f"shapstream: using {describe_stores(settings)}", err=True)
    with reported(settings, hint=_OTHER_STORE[settings.mode]):
        async with open_stores(settings) as stores:
            yield stores


# What to do when the store of the rule is not the one the user meant.
_OTHER_STORE: Final = {
    "kafka": (
        " For the state of `make run` instead: start it once (its store in SHAPSTREAM_DATA_DIR "
        "is then used), or set SHAPSTREAM_MODE=embedded."
    ),
    "embedded": " For Cassandra instead, set SHAPSTREAM_MODE=kafka.",
}
