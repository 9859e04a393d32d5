#!/usr/bin/env bash
# `make bench`: every benchmark, each printing ratios to a baseline measured in the same run.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
SERVICES="$PY deploy/local/services.py"
mkdir -p bench/out

echo "==> TreeSHAP engines on the two reference models"
bash bench/engine.sh

echo "==> console: the decision page's load in Chromium, against the JSON API it shows"
$PY -m bench.console --runs 20

# Stop only what this run starts: servers a developer already had running stay up.
if $SERVICES status >/dev/null 2>&1; then
  echo "==> using the Kafka and Cassandra already running"
else
  trap '$SERVICES stop' EXIT
  echo "==> starting Kafka and Cassandra"
fi
$SERVICES start
eval "$($SERVICES env)"

echo "==> audit export of 100,000 decisions from Cassandra: rows/s, peak memory, verify"
$PY -m bench.audit_export --records 100000 --days 2

echo "==> idempotency designs: Cassandra CPU per caller-id decision (docs/decision-path.md)"
$PY -m bench.claims --rounds 5 --decisions 20000

# Installs MLServer 1.7.1 on first use, outside the checkout (see bench/mlserver.py).
echo "==> gateway side by side: shapstream (caller ids, service ids), minimal FastAPI, MLServer"
$PY -m bench.gateway --rounds 3 --seconds 10 --concurrency 16 "$@"

echo "==> end to end: 1,000 decisions/s for 60 s, 3 runs"
$PY -m bench.e2e --rate 1000 --seconds 60 --runs 3

echo "==> population aggregates: worker CPU per decision with them / without, at 1,000 decisions/s"
$PY -m bench.population_worker --pairs 3 --decisions 20000 --rate 1000

echo "==> population queries: importance, drift, reasons over 30 days x 86.4 M decisions"
$PY -m bench.population_queries --days 30 --requests 200
