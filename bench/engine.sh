#!/usr/bin/env bash
# Engine benchmark on both reference models (built and cached by bench/reference_models.py).
#   bench/engine.sh [extra `bench engine` options, e.g. --json or --repeats 7]
# Tables go to stdout, progress to stderr. One thread per engine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
OUT="${OUT:-bench/out/models}"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
"$PY" bench/reference_models.py "$OUT" >/dev/null
for model in ref_300x6 ref_1000x8; do
    "$PY" -m service.benchmarks.cli engine --model "$OUT/$model.json" "$@"
done
