"""Many single-partition writes sent as few requests: unlogged batches of statements that share
their replicas.

Most of what a Cassandra write costs, on the server and in the driver, is the request, not the
row: 16 rows of ~1 kB in one unlogged batch took a quarter of the server CPU of 16 separate
inserts (bench/claims.py, docs/decision-path.md). An unlogged batch is no transaction (no
batchlog, each partition applies on its own) and, across partitions, it is only cheap when its
coordinator holds every partition in it: so statements are grouped by their replica set, and
each batch is routed (token-aware) to one of those replicas. On a single node, or with RF equal
to the node count, that is one group.

Cassandra warns above `batch_size_warn_threshold` (5 KiB by default) and refuses above
`batch_size_fail_threshold` (50 KiB): batches here stay under `max_bytes`, and a statement
bigger than that is sent alone, as batches' limits do not apply to it.
"""

from collections.abc import Callable, Hashable, Sequence

from cassandra.query import BatchStatement, BatchType, BoundStatement, Statement

# Counted as bound values; the server's own measure of a batch (column names, timestamps,
# TTLs) came out ~20% larger here, so 24 KiB here is ~29 KiB there: under the 33 KiB warning
# threshold deployments set (deploy/local/cassandra/cassandra.yaml, docs/decision-path.md)
# and far under the 50 KiB refusal.
MAX_BATCH_BYTES = 24 * 1024
MAX_BATCH_STATEMENTS = 64


def statement_bytes(statement: BoundStatement) -> int:
    """Bytes of the bound values, what the server's batch size check counts."""
    # Unset and null values are markers, not bytes.
    return sum(len(value) for value in statement.values if isinstance(value, bytes))


def grouped_batches(
    statements: Sequence[BoundStatement],
    replicas_of: Callable[[bytes], Hashable],
    *,
    max_bytes: int = MAX_BATCH_BYTES,
    max_statements: int = MAX_BATCH_STATEMENTS,
) -> list[Statement]:
    """`statements` as unlogged batches (or alone when too big), each within one replica set."""
    groups: dict[Hashable, list[BoundStatement]] = {}
    alone: list[Statement] = []
    for statement in statements:
        if statement_bytes(statement) > max_bytes:
            alone.append(statement)
        else:
            groups.setdefault(replicas_of(statement.routing_key), []).append(statement)
    batches: list[Statement] = list(alone)
    for members in groups.values():
        batches += _split(members, max_bytes, max_statements)
    return batches


def _split(members: list[BoundStatement], max_bytes: int, max_statements: int) -> list[Statement]:
    out: list[Statement] = []
    current: list[BoundStatement] = []
    size = 0
    for statement in members:
        need = statement_bytes(statement)
        if current and (size + need > max_bytes or len(current) >= max_statements):
            out.append(_batch(current))
            current, size = [], 0
        current.append(statement)
        size += need
    if current:
        out.append(_batch(current))
    return out


def _batch(members: list[BoundStatement]) -> Statement:
    if len(members) == 1:
        return members[0]
    batch = BatchStatement(batch_type=BatchType.UNLOGGED)
    for statement in members:
        batch.add(statement)
    # Every member is idempotent (upserts), so the batch may be retried as a whole. The
    # driver routes it by its first member, to a replica of the set its members share.
    batch.is_idempotent = all(s.is_idempotent for s in members)
    return batch
