"""Deployment helpers; a package only so that mypy resolves deploy/local/{kafka,cassandra}/
(config templates) as deploy.local.kafka, not as the `kafka` / `cassandra` libraries."""
