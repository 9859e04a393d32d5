"""Population figures from stored aggregates: global importance, attribution drift, reason
frequencies."""
