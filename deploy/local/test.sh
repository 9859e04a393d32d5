#!/usr/bin/env bash
# `make test`: lint, start the servers (unless the environment points at others), run every
# test, and stop what was started even when a test fails.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
SERVICES="$PY deploy/local/services.py"

echo "==> lint and type check"
make --no-print-directory lint

trap '$SERVICES stop' EXIT
echo "==> starting Kafka and Cassandra"
$SERVICES start
eval "$($SERVICES env)"

echo "==> tests"
$PY -m pytest
