"""`shapstream keys`: create, list and revoke API keys (Cassandra, or SQLite in embedded mode)."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, TypeVar

import typer

from service.cli.stores import STORE_RULE, store_settings, using_stores
from service.core.ports import AccessStore
from service.settings import Settings

T = TypeVar("T")

# The settings these commands read that a user would change, with the rule that picks the store.
STORE_SETTINGS = (
    "Settings (environment): SHAPSTREAM_MODE, SHAPSTREAM_DATA_DIR, SHAPSTREAM_CASSANDRA_HOSTS, "
    f"SHAPSTREAM_CASSANDRA_KEYSPACE. {STORE_RULE}"
)

keys_app = typer.Typer(
    no_args_is_help=True, help=f"API keys: create, list, revoke.\n\n{STORE_SETTINGS}"
)

Name = Annotated[str, typer.Option("--name", help="Who or what the key is for (logged on use).")]
Scopes = Annotated[
    str,
    typer.Option("--scopes", help="Comma-separated: predict, explanations:read, audit:export."),
]


@keys_app.command(
    help="Create a key; it is printed once (alone on stdout), and only its SHA-256 is stored."
    f"\n\n{STORE_SETTINGS}"
)
def create(name: Name, scopes: Scopes) -> None:
    from service.core.access import new_api_key, parse_scopes

    try:
        parsed = parse_scopes(scopes)
        key, record = new_api_key(name, parsed)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    settings = store_settings()
    _run(settings, lambda access: access.put_key(record))
    typer.echo(f"Created key {record.name!r} with scopes {', '.join(sorted(parsed))}.", err=True)
    typer.echo("Store it now: it cannot be shown again.", err=True)
    # Alone on stdout, so `KEY=$(shapstream keys create ...)` captures just the key.
    typer.echo(key)


@keys_app.command(
    "list",
    help="Names, scopes and creation times of the stored keys (never the keys or their "
    f"hashes).\n\n{STORE_SETTINGS}",
)
def list_keys() -> None:
    keys = _run(store_settings(), lambda access: access.keys())
    for key in keys:
        typer.echo(
            f"{key.created_at:%Y-%m-%dT%H:%M:%SZ}  {key.name}  {','.join(sorted(key.scopes))}"
        )


@keys_app.command(
    help="Delete every key of that name; running gateways refuse it once their cache expires "
    f"(SHAPSTREAM_SECURITY_KEY_CACHE_S, default 30).\n\n{STORE_SETTINGS}"
)
def revoke(name: Annotated[str, typer.Argument(help="Name of the key(s) to revoke.")]) -> None:
    settings = store_settings()

    async def delete(access: AccessStore) -> int:
        matching = [k for k in await access.keys() if k.name == name]
        for key in matching:
            await access.delete_key(key.key_hash)
        return len(matching)

    count = _run(settings, delete)
    if count == 0:
        typer.echo(f"no key named {name!r}", err=True)
        raise typer.Exit(1)
    typer.echo(
        f"revoked {count} key(s) named {name!r}; gateways stop accepting them within "
        f"{settings.security.key_cache_s:g} s",
        err=True,
    )


def _run(settings: Settings, action: Callable[[AccessStore], Awaitable[T]]) -> T:
    async def main() -> T:
        async with open_access_store(settings) as access:
            return await action(access)

    return asyncio.run(main())


@asynccontextmanager
async def open_access_store(settings: Settings) -> AsyncIterator[AccessStore]:
    """The access store that `settings` name (see `store_settings`), schema ensured."""
    async with using_stores(settings) as stores:
        yield stores.access
