"""Every Prometheus metric of the service, registered on a registry the caller owns."""

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets around the budgets: single-digit ms predict, 200 ms freshness.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
FRESHNESS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


@dataclass(frozen=True)
class Metrics:
    """Names carry the `shapstream_` prefix; labels stay low-cardinality (never a txn id)."""

    registry: CollectorRegistry
    requests: Counter
    request_seconds: Histogram
    events_published: Counter
    publish_failures: Counter
    explanations: Counter
    engine_fallbacks: Counter
    batch_size: Histogram
    batch_seconds: Histogram
    consumer_lag: Gauge
    freshness_seconds: Histogram
    dead_letters: Counter
    commit_failures: Counter


def create_metrics(registry: CollectorRegistry | None = None) -> Metrics:
    """Register all metrics on `registry` (a fresh one by default)."""
    reg = registry if registry is not None else CollectorRegistry()
    return Metrics(
        registry=reg,
        requests=Counter(
            "shapstream_http_requests_total",
            "HTTP requests by route and status.",
            ["method", "route", "status"],
            registry=reg,
        ),
        request_seconds=Histogram(
            "shapstream_http_request_seconds",
            "HTTP request latency by route.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        ),
        events_published=Counter(
            "shapstream_events_published_total",
            "Decision events acknowledged by the bus.",
            ["model"],
            registry=reg,
        ),
        publish_failures=Counter(
            "shapstream_publish_failures_total",
            "Publishes that missed their deadline or failed.",
            registry=reg,
        ),
        explanations=Counter(
            "shapstream_explanations_total",
            "Explanations computed and written, by engine.",
            ["engine"],
            registry=reg,
        ),
        engine_fallbacks=Counter(
            "shapstream_engine_fallbacks_total",
            "Model versions explained by pred_contribs because the fast engine cannot.",
            registry=reg,
        ),
        batch_size=Histogram(
            "shapstream_worker_batch_size",
            "Events per consumed batch.",
            buckets=BATCH_BUCKETS,
            registry=reg,
        ),
        batch_seconds=Histogram(
            "shapstream_worker_batch_seconds",
            "Time to explain and write one batch.",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        ),
        consumer_lag=Gauge(
            "shapstream_worker_lag",
            "Events not yet consumed, summed over assigned partitions.",
            registry=reg,
        ),
        freshness_seconds=Histogram(
            "shapstream_explanation_freshness_seconds",
            "From decision to written explanation.",
            buckets=FRESHNESS_BUCKETS,
            registry=reg,
        ),
        dead_letters=Counter(
            "shapstream_dead_letters_total",
            "Events sent to the dead-letter topic, by reason.",
            ["reason"],
            registry=reg,
        ),
        commit_failures=Counter(
            "shapstream_commit_failures_total",
            "Offset commits refused (the batch will be redelivered; writes are idempotent).",
            registry=reg,
        ),
    )
