"""`shapstream db`: the Cassandra keyspace and tables."""

import asyncio

import typer

from service.settings import Settings

db_app = typer.Typer(no_args_is_help=True, help="The Cassandra schema.")


@db_app.command(
    help="Create the keyspace and tables that are missing (Cassandra only: the embedded store "
    "of `shapstream run` needs no migration).\n\n"
    "Settings (environment): SHAPSTREAM_CASSANDRA_HOSTS, SHAPSTREAM_CASSANDRA_KEYSPACE, "
    "SHAPSTREAM_CASSANDRA_REPLICATION_FACTOR, SHAPSTREAM_CASSANDRA_LOCAL_DC, "
    "SHAPSTREAM_CASSANDRA_USERNAME, SHAPSTREAM_CASSANDRA_PASSWORD, SHAPSTREAM_RETENTION_DAYS "
    "(how long rows are kept)."
)
def migrate() -> None:
    """Create the missing keyspace and tables in Cassandra."""
    from service.cli.preflight import reported

    settings = Settings(mode="kafka")
    cassandra = settings.cassandra
    hint = " (The embedded store of `make run` needs no migration.)"
    with reported(settings, hint=hint):
        created, kept = asyncio.run(_migrate(settings))
    typer.echo(f"Cassandra {cassandra.hosts}, keyspace {cassandra.keyspace}")
    for table in created:
        typer.echo(f"  created  {table}")
    for table in kept:
        typer.echo(f"  exists   {table}")
    typer.echo(f"rows expire after {settings.retention_days} days")


async def _migrate(settings: Settings) -> tuple[list[str], list[str]]:
    """Run the migration; the store's tables it created, and those that were already there."""
    from service.adapters import cassandra_access, cassandra_population, cassandra_store

    tables = cassandra_store.TABLES + cassandra_access.TABLES + cassandra_population.TABLES
    store = await cassandra_store.CassandraStore.from_settings(settings)
    try:
        before = await store.existing_tables()
        await store.migrate()
        await cassandra_access.CassandraAccessStore(store).migrate()
        await cassandra_population.CassandraPopulationStore(store).migrate()
        after = await store.existing_tables()
    finally:
        await store.close()
    missing = sorted(set(tables) - after)
    if missing:
        raise RuntimeError(f"tables still missing after the migration: {', '.join(missing)}")
    return [t for t in tables if t not in before], [t for t in tables if t in before]
