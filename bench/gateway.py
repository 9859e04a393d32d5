"""Gateway side by side: shapstream, a minimal FastAPI handler and MLServer on the same model.

    .venv/bin/python -m bench.gateway [--rounds 3] [--seconds 10] [--concurrency 16]
                                      [--skip-mlserver]

Needs Kafka and Cassandra (`make services`). Every server serves the 300-tree depth-6
reference model (bench/reference_models.py) and is sent the same rows, 30 numbers without
missing values (NaN cannot travel in MLServer's JSON), by `concurrency` keep-alive clients in a
closed loop. Rounds go round-robin over the servers so that the noise of this shared machine
falls on all alike; medians over rounds are reported, with the CPU time per request of each
server process (and of Kafka and Cassandra for the shapstream rounds) read from /proc.

- shapstream caller ids: `shapstream serve`, every request with its own transaction_id (what
  callers run: the id makes a retry safe);
- shapstream service ids: the same gateway, requests without transaction_id;
- minimal: bench/minimal_app.py, the least FastAPI handler that scores the model;
- MLServer 1.7.1 with mlserver-xgboost (V2 inference protocol), installed on first use into
  a virtualenv outside the checkout (bench/mlserver.py), inference in its server process.

Every server scores on one thread (OMP_NUM_THREADS=1): on 2 shared cores, OpenMP threads
spinning beside the load generator would slow MLServer down for nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench import mlserver
from bench.cpu import fmt_us, per_op_us, read_cpu
from bench.engine import synthetic_rows
from bench.loadgen import Body, Result, closed_loop, cycling, median, with_transaction_ids
from bench.procs import (
    ROOT,
    SHAPSTREAM,
    backend_pids,
    create_key,
    drop_run_data,
    free_port,
    running,
    wait_http,
)
from bench.reference_models import build
from service.core.registry import LoadedModel

OUT = ROOT / "bench" / "out"
MODEL = "ref_300x6"
MODEL_NAME = "ref-300x6"
ROWS = 1000
ROW_SEED = 1
CALLER, SERVICE, MINIMAL, MLSERVER = (
    "shapstream caller ids",
    "shapstream service ids",
    "minimal",
    "MLServer",
)
# Goals of the decision-path issue: throughput of "shapstream caller ids" over the others'.
GOALS = {MLSERVER: 1.5, MINIMAL: 0.5}
# Each server scores on one thread; see the module docstring.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PREDICTIONS = "/v1/predictions"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Target:
    """One server configuration under load: where to send what, and whose CPU to read."""

    name: str
    port: int
    path: str
    bodies: Callable[[str], Body]  # round tag -> request i's body
    headers: Mapping[str, str] = field(default_factory=dict)
    pids: dict[str, int | None] = field(default_factory=dict)
    results: list[Result] = field(default_factory=list)
    cpu_us: list[dict[str, float | None]] = field(default_factory=list)


def model_directory(model_file: Path, root: Path) -> Path:
    """`model_file` as a shapstream model directory, made afresh under `root`."""
    shutil.rmtree(root, ignore_errors=True)
    dest = root / MODEL_NAME
    done = subprocess.run(
        [SHAPSTREAM, "model", "init", str(model_file), str(dest), "--name", MODEL_NAME],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if done.returncode != 0:
        sys.exit(f"shapstream model init failed:\n{done.stdout}{done.stderr}")
    return dest


def request_rows(features: list[str]) -> tuple[list[bytes], list[bytes]]:
    """The same rows as shapstream bodies ({"features": ...}) and as V2 inference bodies."""
    x = synthetic_rows(ROWS, n_features=len(features), seed=ROW_SEED, missing_rate=0.0)
    ours, v2 = [], []
    for row in x.tolist():  # float32 values as exact Python floats
        ours.append(orjson.dumps({"features": dict(zip(features, row, strict=True))}))
        v2.append(mlserver.infer_body(row))
    return ours, v2


def _post(port: int, path: str, body: bytes, headers: Mapping[str, str]) -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=body,
        headers={"Content-Type": "application/json", **headers},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:  # loopback only
        return orjson.loads(answer.read())


def check_same_scores(targets: dict[str, Target], ours: list[bytes], v2: list[bytes]) -> None:
    """Every server must answer the same probability for the same row (within 1e-6)."""
    gateway, minimal = targets[SERVICE], targets[MINIMAL]
    for i in range(5):
        expected = _post(gateway.port, PREDICTIONS, ours[i], gateway.headers)["prediction"]
        p = float(expected["probability"])
        got = {MINIMAL: float(_post(minimal.port, PREDICTIONS, ours[i], {})["probability"])}
        if MLSERVER in targets:
            answer = _post(targets[MLSERVER].port, targets[MLSERVER].path, v2[i], {})
            got[MLSERVER] = float(answer["outputs"][0]["data"][0])
        for name, q in got.items():
            if abs(q - p) > 1e-6:
                sys.exit(
                    f"row {i}: {name} answers probability {q!r}, shapstream {p!r}: not the "
                    "same computation, so the comparison would mean nothing"
                )
    _say(f"same probabilities (within 1e-6) from {', '.join([SERVICE, *got])} on 5 rows")


def measure(
    target: Target, tag: str, concurrency: int, seconds: float
) -> tuple[Result, dict[str, float | None]]:
    """One closed-loop round against `target`, and its processes' CPU µs per request."""
    start, client = read_cpu(target.pids), time.process_time()
    result = asyncio.run(
        closed_loop(
            "127.0.0.1",
            target.port,
            target.path,
            target.bodies(tag),
            concurrency,
            seconds,
            target.headers,
        )
    )
    client = time.process_time() - client  # this process only, not the servers it started
    n = len(result.latencies_s)
    cpu = per_op_us(start, read_cpu(target.pids), n)
    cpu["client"] = 1e6 * client / n if n else None
    return result, cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of a round")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds per server, once")
    parser.add_argument("--concurrency", type=int, default=16, help="keep-alive connections")
    parser.add_argument("--skip-mlserver", action="store_true", help="for quick local runs")
    args = parser.parse_args()
    if args.rounds < 1 or args.seconds <= 0 or args.concurrency < 1:
        parser.error("--rounds, --seconds and --concurrency must be positive")

    mlserver_bin = None
    if not args.skip_mlserver:
        try:
            mlserver_bin = mlserver.ensure_installed(_say)
        except mlserver.InstallFailed as exc:
            sys.exit(str(exc))

    work = OUT / "gateway"
    model_file = build(names=[MODEL], formats=["xgboost"])[f"{MODEL}.xgboost"]
    model_dir = model_directory(model_file, work / "models")
    features = [f.name for f in LoadedModel.from_directory(model_dir).schema.features]
    ours, v2 = request_rows(features)
    run_id = uuid.uuid4().hex[:8]
    env = {
        **ONE_THREAD,
        "SHAPSTREAM_MODELS_DIR": str(model_dir.parent),
        "SHAPSTREAM_KAFKA_TOPIC": f"bench-gateway-{run_id}",
        "SHAPSTREAM_CASSANDRA_KEYSPACE": f"bench_gateway_{run_id}",
        "SHAPSTREAM_LOG_LEVEL": "WARNING",
        # A spool of this run's own, under bench/out: never one an earlier run left behind.
        "SHAPSTREAM_SPOOL_DIR": str(work / f"spool-{run_id}"),
    }
    gw_port, min_port = free_port(), free_port()
    commands = {
        "gateway": [SHAPSTREAM, "serve", "--port", str(gw_port)],
        "minimal": [sys.executable, "-m", "bench.minimal_app", "--model-dir", str(model_dir)],
    }
    commands["minimal"] += ["--port", str(min_port)]
    ml_port = free_port()
    if mlserver_bin is not None:
        repo = work / "mlserver"
        shutil.rmtree(repo, ignore_errors=True)
        mlserver.write_repository(model_file, repo, MODEL_NAME, ml_port, free_port(), free_port())
        commands["mlserver"] = [str(mlserver_bin), "start", str(repo)]
    readiness = {
        "gateway": (gw_port, "/readyz"),
        "minimal": (min_port, "/healthz"),
        "mlserver": (ml_port, f"/v2/models/{MODEL_NAME}/ready"),
    }

    with contextlib.ExitStack() as stack:
        procs = {}
        for name, command in commands.items():
            log = OUT / f"gateway-{name}.log"
            procs[name] = (stack.enter_context(running(command, env, log)), log)
        for name, (proc, log) in procs.items():
            port, path = readiness[name]
            _say(f"waiting for {name} (pid {proc.pid}) on port {port}")
            wait_http(port, path, timeout_s=180.0, proc=proc, log=log)
        key = create_key(env, f"bench-gateway-{run_id}")
        auth = {"Authorization": f"Bearer {key}"}
        gateway = {"server": procs["gateway"][0].pid, **backend_pids()}
        targets = {
            CALLER: Target(
                CALLER,
                gw_port,
                PREDICTIONS,
                lambda tag: with_transaction_ids(f"{run_id}-{tag}-", ours),
                auth,
                gateway,
            ),
            SERVICE: Target(SERVICE, gw_port, PREDICTIONS, lambda _: cycling(ours), auth, gateway),
            MINIMAL: Target(
                MINIMAL,
                min_port,
                PREDICTIONS,
                lambda _: cycling(ours),
                pids={"server": procs["minimal"][0].pid},
            ),
        }
        if "mlserver" in procs:
            targets[MLSERVER] = Target(
                MLSERVER,
                ml_port,
                mlserver.infer_path(MODEL_NAME),
                lambda _: cycling(v2),
                pids={"server": procs["mlserver"][0].pid},
            )
        check_same_scores(targets, ours, v2)
        _say(f"warm-up: {args.warmup:.0f} s per server")
        for target in targets.values():
            measure(target, "warmup", args.concurrency, args.warmup)
        for i in range(args.rounds):
            for target in targets.values():
                result, cpu = measure(target, f"r{i}", args.concurrency, args.seconds)
                target.results.append(result)
                target.cpu_us.append(cpu)
                per_process = ", ".join(f"{k} {fmt_us(v, 0)} µs" for k, v in cpu.items())
                print(
                    f"round {i + 1}/{args.rounds} {target.name:22s} {result.summary()}, "
                    f"CPU/req {per_process}",
                    flush=True,
                )
    asyncio.run(
        drop_run_data(env["SHAPSTREAM_CASSANDRA_KEYSPACE"], [env["SHAPSTREAM_KAFKA_TOPIC"]])
    )
    report(list(targets.values()), args)


def _median_of(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return median(known) if len(known) == len(values) and known else None


def report(targets: list[Target], args: argparse.Namespace) -> None:
    print(
        f"\nPOST one row of {MODEL_NAME} (30 features), {args.concurrency} keep-alive clients, "
        f"medians over {args.rounds} rounds of {args.seconds:.0f} s"
    )
    print("req/s counts answers 200; CPU is µs per request of each process over the round")
    head = f"{'server':22s} {'req/s':>7s} {'p50 ms':>7s} {'p99 ms':>7s} {'server':>7s} "
    head += f"{'Kafka':>7s} {'Cass.':>7s} {'client':>7s}  statuses"
    print(head)
    rates: dict[str, float] = {}
    for t in targets:
        rates[t.name] = median([r.ok_rate for r in t.results])
        p50 = median([r.percentile_ms(0.5) for r in t.results])
        p99 = median([r.percentile_ms(0.99) for r in t.results])
        statuses: dict[int, int] = {}
        for r in t.results:
            for status, n in r.statuses.items():
                statuses[status] = statuses.get(status, 0) + n
        cpu = {
            k: _median_of([c.get(k) for c in t.cpu_us])
            for k in ("server", "kafka", "cassandra", "client")
        }
        cells = [
            fmt_us(cpu[k], 7) if k in t.cpu_us[0] else f"{'-':>7s}"
            for k in ("server", "kafka", "cassandra", "client")
        ]
        print(
            f"{t.name:22s} {rates[t.name]:7.0f} {p50:7.2f} {p99:7.2f} {' '.join(cells)}  "
            f"{dict(sorted(statuses.items()))}"
        )
    print(
        "shapstream checks an API key on every request; minimal and MLServer have no auth.\n"
        "client: the load generator (this process), on the same 2 cores as the servers. "
        "Status 0: the connection failed before an answer."
    )
    ours = rates[CALLER]
    print()
    for other, goal in [*GOALS.items(), (SERVICE, None)]:
        label = f"throughput {CALLER} / {other}:"
        if other not in rates:
            print(f"{label} n/a ({other} not run)")
        elif not rates[other]:
            print(f"{label} n/a ({other} answered no 200)")
        elif goal is None:
            print(f"{label} {ours / rates[other]:.2f}x (no goal)")
        else:
            ratio = ours / rates[other]
            verdict = "met" if ratio >= goal else "missed"
            print(f"{label} {ratio:.2f}x (goal >= {goal}x: {verdict})")


if __name__ == "__main__":
    main()
