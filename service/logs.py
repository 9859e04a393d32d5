"""Logging set-up for the processes the CLI starts (never at import)."""

import logging
import os


def configure_logging() -> None:
    """One line per record on stderr; level from SHAPSTREAM_LOG_LEVEL (default INFO)."""
    logging.basicConfig(
        level=os.environ.get("SHAPSTREAM_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # The Cassandra driver and aiokafka are chatty at INFO.
    for noisy in ("cassandra", "aiokafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
