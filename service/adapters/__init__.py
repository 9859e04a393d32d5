"""Adapters for the ports: Kafka, the embedded bus, Cassandra, SQLite."""
