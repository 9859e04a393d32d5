"""The stores a command-line tool works on: those of SHAPSTREAM_MODE, schema ensured."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from service.ports import AccessStore, ExplanationStore
from service.settings import Settings


@asynccontextmanager
async def open_stores(settings: Settings) -> AsyncIterator[tuple[ExplanationStore, AccessStore]]:
    """Cassandra (kafka mode) or the embedded SQLite file, with the access log on its connection."""
    if settings.mode == "kafka":
        from service.adapters.cassandra_access import CassandraAccessStore
        from service.adapters.cassandra_store import CassandraStore

        cassandra = await CassandraStore.from_settings(settings)
        try:
            await cassandra.migrate()
            access: AccessStore = CassandraAccessStore(cassandra)
            await access.migrate()
            yield cassandra, access
        finally:
            await cassandra.close()
        return
    from service.adapters.sqlite_access import SqliteAccessStore
    from service.adapters.sqlite_store import SqliteStore

    sqlite = await SqliteStore.from_settings(settings)
    try:
        await sqlite.migrate()
        access = SqliteAccessStore(sqlite)
        await access.migrate()
        yield sqlite, access
    finally:
        await sqlite.close()
