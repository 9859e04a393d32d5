"""`shapstream db`: the Cassandra keyspace and tables."""

import asyncio

import typer

from service.settings import Settings

db_app = typer.Typer(no_args_is_help=True, help="The Cassandra schema.")


@db_app.command()
def migrate() -> None:
    """Create the keyspace and tables that are missing (SHAPSTREAM_CASSANDRA_* settings)."""
    from cassandra.cluster import NoHostAvailable

    settings = Settings()
    cassandra = settings.cassandra
    try:
        created, kept = asyncio.run(_migrate(settings))
    except NoHostAvailable as error:
        typer.echo(f"cannot reach Cassandra at {cassandra.hosts}: {error}", err=True)
        raise typer.Exit(1) from error
    typer.echo(f"Cassandra {cassandra.hosts}, keyspace {cassandra.keyspace}")
    for table in created:
        typer.echo(f"  created  {table}")
    for table in kept:
        typer.echo(f"  exists   {table}")
    typer.echo(f"rows expire after {settings.retention_days} days")


async def _migrate(settings: Settings) -> tuple[list[str], list[str]]:
    """Run the migration; the store's tables it created, and those that were already there."""
    from service.adapters import cassandra_access, cassandra_store

    tables = cassandra_store.TABLES + cassandra_access.TABLES
    store = await cassandra_store.CassandraStore.from_settings(settings)
    try:
        before = await store.existing_tables()
        await store.migrate()
        await cassandra_access.CassandraAccessStore(store).migrate()
        after = await store.existing_tables()
    finally:
        await store.close()
    missing = sorted(set(tables) - after)
    if missing:
        raise RuntimeError(f"tables still missing after the migration: {', '.join(missing)}")
    return [t for t in tables if t not in before], [t for t in tables if t in before]
