"""Engine benchmark: the exact TreeSHAP engines on the same rows, interleaved, per model format.

    .venv/bin/python -m bench.engine --model MODEL [--data ROWS] [--batches 1,64,1024] [--json]

MODEL is an XGBoost JSON file, a LightGBM text file or a scikit-learn `.skops` file.
`bench/engine.sh` runs it on the reference models of each format (`make bench` runs that).

Engines: the framework's own exact TreeSHAP (the reference: xgboost ``pred_contribs``,
LightGBM ``pred_contrib``, shap's TreeExplainer for scikit-learn, which has none of its own),
shapstream's `FastTreeShap` on the model's Forest, and for XGBoost also shap's own C++ TreeSHAP
(``shap.TreeExplainer`` hands Booster models to ``pred_contribs``, so the benchmark forces its
internal path) and FastTreeSHAP v1/v2 when ``fasttreeshap`` is importable. All run on one
thread. Every repeat gives each engine the same batch, in a rotating order; rows/s are medians
over repeats, and each engine's output is compared with the reference on the very same rows.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

N_FEATURES = 30
MISSING_FEATURES = 5
MISSING_RATE = 0.05
REFERENCE_NAMES = {"xgboost": "xgboost-pred_contribs", "lightgbm": "lightgbm-pred_contrib"}

Explain = Callable[[NDArray[np.float32]], NDArray[np.float64]]


def single_thread() -> None:
    """Pin OpenMP/BLAS pools to one thread (effective before those libraries load)."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"


def synthetic_rows(
    n: int, n_features: int = N_FEATURES, seed: int = 0, missing_rate: float = MISSING_RATE
) -> NDArray[np.float32]:
    """Standard normal rows; the first `MISSING_FEATURES` features are NaN at `missing_rate`."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, n_features)).astype(np.float32)
    k = min(MISSING_FEATURES, n_features)
    x[:, :k][rng.random((n, k)) < missing_rate] = np.nan
    return np.ascontiguousarray(x)


def load_rows(path: Path, n_features: int) -> NDArray[np.float32]:
    """Rows from .npy or .csv (optional header; empty cells are missing)."""
    if path.suffix == ".npy":
        x = np.load(path)
    else:
        import pandas as pd

        frame = pd.read_csv(path)
        if not all(isinstance(c, str) and not _is_number(c) for c in frame.columns):
            frame = pd.read_csv(path, header=None)
        x = frame.to_numpy(dtype=np.float32, na_value=np.nan)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != n_features:
        raise ValueError(f"{path}: expected (rows, {n_features}) values, got {x.shape}")
    return np.ascontiguousarray(x)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass
class EngineResult:
    name: str
    batch: int
    rows_per_s: float
    ratio_to_reference: float
    max_abs_diff: float
    ms_per_batch: float
    repeats: int


@dataclass
class BenchReport:
    model: str
    n_features: int
    n_outputs: int
    rows: int
    results: list[EngineResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    build: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        keys = ("name", "batch", "rows_per_s", "ratio_to_reference", "max_abs_diff")
        return {"engines": [{k: asdict(r)[k] for k in keys} for r in self.results]}

    def table(self) -> str:
        head = (
            f"{'engine':<24} {'batch':>6} {'rows/s':>10} {'ms/batch':>10} "
            f"{'x reference':>15} {'max |diff|':>11} {'reps':>5}"
        )
        lines = [f"model {self.model}: {self.n_features} features, {self.n_outputs} output(s)"]
        lines += [*self.notes, head, "-" * len(head)]
        for r in self.results:
            lines.append(
                f"{r.name:<24} {r.batch:>6} {r.rows_per_s:>10.1f} {r.ms_per_batch:>10.2f} "
                f"{r.ratio_to_reference:>15.2f} {r.max_abs_diff:>11.2e} {r.repeats:>5}"
            )
        return "\n".join(lines)


def _as3d(phi: NDArray[Any], rows: int, n_features: int) -> NDArray[np.float64]:
    return np.asarray(phi, dtype=np.float64).reshape(rows, -1, n_features + 1)


def engines_for(
    model_path: Path, notes: list[str], build: dict[str, Any]
) -> tuple[list[tuple[str, Explain]], int]:
    """(name, explain) for every engine that can run the model, the reference first, and the
    model's feature count; reasons an engine cannot run go to `notes`."""
    from service.core.engine.fast import FastTreeShap
    from service.core.formats.base import UnsupportedModel

    framework, reference, booster = _load(model_path)
    n_features = framework.n_features
    out: list[tuple[str, Explain]] = [reference]
    try:
        t0 = time.perf_counter()
        engine = FastTreeShap(framework.forest())
        build.update(
            {
                "wall_seconds": round(time.perf_counter() - t0, 3),
                "precompute_seconds": round(engine.stats.precompute_seconds, 3),
                "memory_mb": round(engine.stats.memory_bytes / 2**20, 1),
                "leaves": engine.stats.leaves,
                "table_entries": engine.stats.table_entries,
                "direct_leaves": engine.stats.direct_leaves,
            }
        )
        out.append((engine.name, engine.contributions))
    except UnsupportedModel as exc:
        notes.append(f"note: shapstream cannot run this model: {exc}")
    if booster is not None:
        out.extend(_shap_engine(booster, n_features, notes))
        out.extend(_fasttreeshap_engines(booster, n_features, notes))
    return out, n_features


def _load(model_path: Path) -> tuple[Any, tuple[str, Explain], Any]:
    """The model as the service reads it, its framework's exact TreeSHAP, and the xgboost
    booster (None for other formats)."""
    from service.core.formats.files import load_model_file

    if model_path.suffix == ".skops":
        return _load_sklearn(model_path)
    framework = load_model_file(model_path.read_bytes())
    reference = framework.reference_engine()
    booster = getattr(framework, "booster", None) if framework.format == "xgboost" else None
    return framework, (REFERENCE_NAMES[framework.format], reference.contributions), booster


def _load_sklearn(model_path: Path) -> tuple[Any, tuple[str, Explain], Any]:
    import shap

    from service.core.formats import sklearn

    estimator = sklearn.load_skops(model_path.read_bytes())
    framework = sklearn.FORMAT.load(sklearn.convert(estimator).to_bytes())
    explainer = shap.TreeExplainer(estimator, feature_perturbation="tree_path_dependent")

    def shap_sklearn(x: NDArray[np.float32]) -> NDArray[np.float64]:
        return _shap_values(explainer, x)

    return framework, ("sklearn-shap", shap_sklearn), None


def _shap_values(explainer: Any, x: NDArray[np.float32]) -> NDArray[np.float64]:
    """shap's values as (rows, outputs, features + 1), bias last."""
    phi = np.asarray(explainer.shap_values(x, check_additivity=False), dtype=np.float64)
    # (rows, features) or (rows, features, outputs)
    phi = phi[:, None, :] if phi.ndim == 2 else np.transpose(phi, (0, 2, 1))
    bias = np.broadcast_to(
        np.asarray(explainer.expected_value, dtype=np.float64).reshape(1, -1, 1),
        (phi.shape[0], phi.shape[1], 1),
    )
    return np.concatenate([phi, bias], axis=2)


def _shap_engine(booster: Any, n_features: int, notes: list[str]) -> list[tuple[str, Explain]]:
    try:
        import shap
    except ImportError:
        notes.append("note: shap is not installed")
        return []
    try:
        explainer = shap.TreeExplainer(booster, feature_perturbation="tree_path_dependent")
        if explainer.model.model_type == "xgboost":
            notes.append(
                "note: shap.TreeExplainer(Booster) delegates to xgboost pred_contribs; "
                "'shap-cpp' forces shap's own C++ TreeSHAP (model.model_type='internal')"
            )
        explainer.model.model_type = "internal"
    except Exception as exc:  # noqa: BLE001 - any failure just skips the engine
        notes.append(f"note: shap's C++ TreeSHAP cannot run this model: {exc}")
        return []

    def shap_cpp(x: NDArray[np.float32]) -> NDArray[np.float64]:
        # With no expected value set, shap takes it from its C++ output's bias column
        # (its init-time value for xgboost 3 models misses the trees' means).
        explainer.expected_value = None
        return _shap_values(explainer, x)

    return [("shap-cpp", shap_cpp)]


def _fasttreeshap_engines(
    booster: Any, n_features: int, notes: list[str]
) -> list[tuple[str, Explain]]:
    try:
        fasttreeshap = importlib.import_module("fasttreeshap")
    except ImportError:
        notes.append("note: fasttreeshap is not installed")
        return []
    out: list[tuple[str, Explain]] = []
    for algorithm in ("v1", "v2"):
        try:
            explainer = fasttreeshap.TreeExplainer(
                booster, algorithm=algorithm, n_jobs=1, feature_perturbation="tree_path_dependent"
            )
            explainer.model.model_type = "internal"
        except Exception as exc:  # noqa: BLE001
            notes.append(f"note: fasttreeshap {algorithm} cannot run this model: {exc}")
            continue

        def run(x: NDArray[np.float32], e: Any = explainer) -> NDArray[np.float64]:
            phi = np.asarray(e.shap_values(x, check_additivity=False), dtype=np.float64)
            phi = phi.reshape(len(x), -1, n_features)
            bias = np.broadcast_to(
                np.asarray(e.expected_value, dtype=np.float64).reshape(1, -1, 1),
                (phi.shape[0], phi.shape[1], 1),
            )
            return np.concatenate([phi, bias], axis=2)

        out.append((f"fasttreeshap-{algorithm}", run))
    return out


def run_bench(
    model_path: Path,
    rows: NDArray[np.float32] | None = None,
    n_rows: int = 2048,
    batches: Sequence[int] = (1, 64, 1024),
    repeats: int = 5,
    single_row_repeats: int = 25,
    budget_s: float = 120.0,
    progress: Callable[[str], None] | None = None,
) -> BenchReport:
    """Times all engines; see the module docstring."""
    say = progress or (lambda _msg: None)
    notes: list[str] = []
    build: dict[str, Any] = {}
    engines, n_features = engines_for(model_path, notes, build)
    reference = engines[0][0]
    x = rows if rows is not None else synthetic_rows(max(n_rows, max(batches)), n_features)
    if build:
        notes.append(f"note: shapstream build: {build}")
    for note in notes:
        say(note)
    probe = engines[0][1](x[:1])
    report = BenchReport(
        model=str(model_path),
        n_features=n_features,
        n_outputs=probe.shape[1],
        rows=len(x),
        notes=notes,
        build=build,
    )
    for batch in batches:
        reps = single_row_repeats if batch == 1 else repeats
        times: dict[str, list[float]] = {name: [] for name, _ in engines}
        diffs: dict[str, float] = {name: 0.0 for name, _ in engines}
        started = time.perf_counter()
        done = 0
        vs_shap = [-1.0, -1.0]
        for rep in range(reps):
            start = (rep * batch) % max(1, len(x) - batch + 1)
            xb = np.ascontiguousarray(x[start : start + batch])
            if len(xb) < batch:  # fewer rows than the batch: cycle them
                xb = np.ascontiguousarray(np.resize(x, (batch, n_features)))
            outputs: dict[str, NDArray[np.float64]] = {}
            order = engines[rep % len(engines) :] + engines[: rep % len(engines)]
            for name, explain in order:
                t0 = time.perf_counter()
                outputs[name] = explain(xb)
                times[name].append(time.perf_counter() - t0)
            if "shap-cpp" in outputs and "shapstream" in outputs:  # both float64
                gap = np.abs(outputs["shapstream"] - outputs["shap-cpp"])
                vs_shap[0] = max(vs_shap[0], float(gap[..., :-1].max(initial=0.0)))
                vs_shap[1] = max(vs_shap[1], float(gap[..., -1].max(initial=0.0)))
            ref = outputs[reference]
            for name, out in outputs.items():
                if out.shape != ref.shape:
                    raise RuntimeError(f"{name} returned {out.shape}, expected {ref.shape}")
                diffs[name] = max(diffs[name], float(np.max(np.abs(out - ref))))
            done = rep + 1
            if done >= 3 and time.perf_counter() - started > budget_s:
                break
        if vs_shap[0] >= 0.0:
            say(
                f"note: batch {batch}: shapstream vs shap-cpp (both float64) max |diff| "
                f"features {vs_shap[0]:.2e}, bias {vs_shap[1]:.2e}"
            )
        ref_t = statistics.median(times[reference])
        for name, _ in engines:
            t = statistics.median(times[name])
            result = EngineResult(
                name=name,
                batch=batch,
                rows_per_s=batch / t,
                ratio_to_reference=ref_t / t,
                max_abs_diff=diffs[name],
                ms_per_batch=t * 1e3,
                repeats=done,
            )
            report.results.append(result)
            say(
                f"[bench] {name:<24} batch={batch:<5} {result.rows_per_s:10.1f} rows/s "
                f"x{result.ratio_to_reference:5.2f} max|diff|={result.max_abs_diff:.2e} "
                f"({done} reps)"
            )
    return report


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(b) for b in text.split(",") if b.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not comma-separated integers: {text!r}") from exc
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("batch sizes must be positive")
    return sizes


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main() -> None:
    single_thread()
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--model", type=Path, required=True, help="XGBoost model file (.json/.ubj)."
    )
    parser.add_argument(
        "--data", type=Path, help="Rows as .csv or .npy; default: synthetic with missing."
    )
    parser.add_argument(
        "--rows", type=_at_least_one, default=2048, help="Rows to draw batches from."
    )
    parser.add_argument(
        "--batches", type=_batch_sizes, default=[1, 64, 1024], help="Comma-separated batch sizes."
    )
    parser.add_argument("--repeats", type=_at_least_one, default=5, help="Repeats per batch.")
    parser.add_argument(
        "--single-repeats", type=_at_least_one, default=25, help="Repeats for batch 1."
    )
    parser.add_argument(
        "--budget", type=float, default=120.0, help="Seconds per batch size after 3 repeats."
    )
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = parser.parse_args()
    if not args.model.exists():
        parser.error(f"--model: {args.model} does not exist")
    n_features = _load(args.model)[0].n_features
    if args.data is not None:
        x = load_rows(args.data, n_features)[: args.rows]
    else:
        x = synthetic_rows(max(args.rows, max(args.batches)), n_features)
    report = run_bench(
        args.model,
        rows=x,
        batches=args.batches,
        repeats=args.repeats,
        single_row_repeats=args.single_repeats,
        budget_s=args.budget,
        progress=stderr,
    )
    print(json.dumps(report.as_json()) if args.json else report.table())


if __name__ == "__main__":
    main()
