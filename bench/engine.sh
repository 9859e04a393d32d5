#!/usr/bin/env bash
# Engine benchmark (bench/engine.py) on both reference models in each format: XGBoost,
# LightGBM, scikit-learn (built and cached by bench/reference_models.py).
#   bench/engine.sh [extra bench/engine.py options, e.g. --json or --repeats 7]
# Tables go to stdout, progress to stderr. One thread per engine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
OUT="${OUT:-bench/out/models}"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
"$PY" -m bench.reference_models "$OUT" >/dev/null
for model in ref_300x6 ref_1000x8; do
    for file in "$model.json" "$model.lgb.txt" "$model.skops"; do
        "$PY" -m bench.engine --model "$OUT/$file" "$@"
    done
done
