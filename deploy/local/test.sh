#!/usr/bin/env bash
# `make test`: lint, start the servers (unless the environment points at others), run every
# test, and stop what was started even when a test fails. Servers that were already running
# and ready before (`make services`) are used and left running.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
SERVICES="$PY deploy/local/services.py"

echo "==> lint and type check"
make --no-print-directory lint

if $SERVICES status >/dev/null 2>&1; then
  echo "==> Kafka and Cassandra already running: using them, leaving them running"
else
  trap '$SERVICES stop' EXIT
  echo "==> starting Kafka and Cassandra"
fi
$SERVICES start
eval "$($SERVICES env)"

echo "==> tests"
$PY -m pytest
