"""Gateway throughput and latency, as a ratio to a minimal FastAPI handler on the same model.

Needs Kafka and Cassandra (`make services`). Rounds alternate between the two servers so
that the noise of this shared machine falls on both alike; medians over rounds are reported.
"""

import argparse
import asyncio
import csv
import random
import sys
import uuid

import orjson

from bench.loadgen import Result, closed_loop, median
from bench.procs import ROOT, SHAPSTREAM, create_key, free_port, running, wait_http

MODEL_DIR = ROOT / "models" / "german-credit"
DATA = ROOT / "data" / "german_credit.csv"
OUT = ROOT / "bench" / "out"


def feature_rows(limit: int = 1000) -> list[dict[str, object]]:
    """German credit rows as request features (numbers as numbers, labels as strings)."""
    with DATA.open(newline="") as f:
        rows = list(csv.DictReader(f))[:limit]
    out: list[dict[str, object]] = []
    for row in rows:
        row.pop("creditability", None)
        out.append({k: _number_or_text(v) for k, v in row.items()})
    return out


def _number_or_text(value: str) -> object:
    try:
        return int(value)
    except ValueError:
        return value


def bodies(rows: list[dict[str, object]]) -> list[bytes]:
    return [orjson.dumps({"features": r}) for r in rows]


def run_round(
    port: int,
    payloads: list[bytes],
    concurrency: int,
    seconds: float,
    headers: dict[str, str] | None = None,
) -> Result:
    rng = random.Random(0)
    return asyncio.run(
        closed_loop(
            "127.0.0.1",
            port,
            "/v1/predictions",
            lambda _: payloads[rng.randrange(len(payloads))],
            concurrency,
            seconds,
            headers,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    payloads = bodies(feature_rows())
    run_id = uuid.uuid4().hex[:8]
    gw_port, base_port = free_port(), free_port()
    env = {
        "SHAPSTREAM_MODELS_DIR": str(ROOT / "models"),
        "SHAPSTREAM_KAFKA_TOPIC": f"bench-gateway-{run_id}",
        "SHAPSTREAM_CASSANDRA_KEYSPACE": "shapstream_bench",
        "SHAPSTREAM_LOG_LEVEL": "WARNING",
    }
    gateway_cmd = [SHAPSTREAM, "serve", "--port", str(gw_port)]
    baseline_cmd = [sys.executable, "-m", "bench.minimal_app", "--model-dir", str(MODEL_DIR)]
    baseline_cmd += ["--port", str(base_port)]
    with (
        running(gateway_cmd, env, OUT / "gateway.log"),
        running(baseline_cmd, env, OUT / "baseline.log"),
    ):
        wait_http(gw_port, "/readyz")
        wait_http(base_port)
        # The gateway checks an API key on every request (a cached hash lookup after the
        # first); the minimal app has no auth, so the ratio includes the cost of auth.
        auth = {"Authorization": f"Bearer {create_key(env, f'bench-gateway-{run_id}')}"}
        headers = {"shapstream": auth, "minimal": {}}
        # Warm both (JIT-free Python, but connection pools and caches fill on first use).
        run_round(gw_port, payloads, args.concurrency, 2, auth)
        run_round(base_port, payloads, args.concurrency, 2)
        results: dict[str, list[Result]] = {"shapstream": [], "minimal": []}
        for i in range(args.rounds):
            for name, port in (("shapstream", gw_port), ("minimal", base_port)):
                result = run_round(port, payloads, args.concurrency, args.seconds, headers[name])
                results[name].append(result)
                print(f"round {i + 1}/{args.rounds} {name:10s} {result.summary()}", flush=True)
    report(results, args.concurrency)


def report(results: dict[str, list[Result]], concurrency: int) -> None:
    rows = {}
    for name, runs in results.items():
        rows[name] = (
            median([r.rate for r in runs]),
            median([r.percentile_ms(0.5) for r in runs]),
            median([r.percentile_ms(0.99) for r in runs]),
        )
    print(f"\nPOST /v1/predictions, {concurrency} keep-alive clients, medians over rounds")
    print(f"{'server':12s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for name, (rate, p50, p99) in rows.items():
        print(f"{name:12s} {rate:8.0f} {p50:8.2f} {p99:8.2f}")
    ours, base = rows["shapstream"], rows["minimal"]
    print(
        f"ratio shapstream/minimal: throughput {ours[0] / base[0]:.2f}x, "
        f"p50 {ours[1] / base[1]:.2f}x, p99 {ours[2] / base[2]:.2f}x"
    )


if __name__ == "__main__":
    main()
