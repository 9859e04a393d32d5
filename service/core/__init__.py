"""The core: model registry, TreeSHAP engines, records. No FastAPI, Kafka or Cassandra here."""
