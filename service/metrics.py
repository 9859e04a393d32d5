"""Every Prometheus metric of the service, registered on a registry the caller owns."""

from dataclasses import dataclass
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets around the budgets: single-digit ms predict, 200 ms freshness.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
FRESHNESS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
ADDITIVITY_BUCKETS = (1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


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
    consumer_lag_seconds: Gauge
    freshness_seconds: Histogram
    explanation_wait_seconds: Histogram
    dead_letters: Counter
    commit_failures: Counter
    in_flight: Gauge
    shed: Counter
    idempotent_replays: Counter
    claims_per_read: Histogram
    dependency_up: Gauge
    spooling: Gauge
    spool_events: Gauge
    spool_bytes: Gauge
    spooled: Counter
    spool_replayed: Counter
    spool_refusals: Counter
    duplicate_events: Counter
    denials: Counter
    build_info: Gauge
    model_info: Gauge
    additivity_error: Histogram
    population: "PopulationMetrics"


@dataclass(frozen=True)
class PopulationMetrics:
    """Today's population figures per model version (service/core/population), from the stored
    aggregates: set by the gateway's refresher, never computed per request. Labels: model
    name, the version's first 12 characters, and a feature or outcome or family of its schema
    (bounded by the schema, never by traffic)."""

    drift_psi: Gauge
    drift_js: Gauge
    drift_ks: Gauge
    drifting: Gauge
    input_drift_psi: Gauge
    ndcg: Gauge
    decisions: Gauge
    reasons: Gauge
    refreshed: Gauge


@dataclass(frozen=True)
class WorkerProbeMetrics:
    """What a worker's /healthz and /readyz answer, as gauges (set as functions by the worker).

    Registered by worker processes only, so a gateway never reports a worker that is not ready.
    """

    ready: Gauge
    progress_age_seconds: Gauge


def create_worker_probe_metrics(registry: CollectorRegistry) -> WorkerProbeMetrics:
    """Register the worker's probe gauges on `registry` (the one of its `Metrics`)."""
    return WorkerProbeMetrics(
        ready=Gauge(
            "shapstream_worker_ready",
            "1 when the worker is ready (GET /readyz: consumer in its group, no step failing).",
            registry=registry,
        ),
        progress_age_seconds=Gauge(
            "shapstream_worker_progress_age_seconds",
            "Time since the consume loop last completed an iteration (GET /healthz fails past "
            "SHAPSTREAM_WORKER_STALL_AFTER_S).",
            registry=registry,
        ),
    )


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
            "HTTP request latency by route: the service's own time, without the wait a client "
            "asked for (GET /v1/explanations?wait, in shapstream_explanation_wait_seconds).",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        ),
        events_published=Counter(
            "shapstream_events_published_total",
            "Decision events made durable before the answer: acknowledged by Kafka or fsync'd "
            "in the gateway's spool (Kafka mode), stored in the outbox (embedded).",
            ["model"],
            registry=reg,
        ),
        publish_failures=Counter(
            "shapstream_publish_failures_total",
            "Decision events not made durable (missed their deadline, spool full, outbox "
            "failed): each answered 503.",
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
            "shapstream_worker_lag_events",
            "Events waiting for this worker: not yet fetched from its assigned Kafka partitions; "
            "in the embedded outbox, stored and not yet written (the batch in flight included).",
            registry=reg,
        ),
        # Set as a function by the event source: it grows while a batch is stuck in retries.
        consumer_lag_seconds=Gauge(
            "shapstream_worker_lag_seconds",
            "Age of the oldest event on this worker's partitions not yet written to the store "
            "(Kafka record timestamp; enqueue time in the embedded outbox): the batch in flight, "
            "else the next event to read when behind; 0 when caught up.",
            registry=reg,
        ),
        freshness_seconds=Histogram(
            "shapstream_explanation_freshness_seconds",
            "From decision to written explanation.",
            buckets=FRESHNESS_BUCKETS,
            registry=reg,
        ),
        explanation_wait_seconds=Histogram(
            "shapstream_explanation_wait_seconds",
            "Time GET /v1/explanations waited, as its client asked (?wait=S), for a worker to "
            "write an explanation not stored yet: from the first miss until it was found or the "
            "wait ran out. Only requests that waited; not in shapstream_http_request_seconds.",
            ["outcome"],
            buckets=FRESHNESS_BUCKETS,
            registry=reg,
        ),
        dead_letters=Counter(
            "shapstream_dead_letters_total",
            "Events set aside unexplained, by reason: sent to the dead-letter topic (Kafka) or "
            "kept in the outbox's dead_letters table (embedded).",
            ["reason"],
            registry=reg,
        ),
        commit_failures=Counter(
            "shapstream_commit_failures_total",
            "Kafka offset commits refused (the batch will be redelivered; writes are "
            "idempotent). Always 0 in the embedded mode, whose outbox has no offsets.",
            registry=reg,
        ),
        in_flight=Gauge(
            "shapstream_http_in_flight_requests",
            "Requests under /v1/ being served now (bounded by SHAPSTREAM_GATEWAY_MAX_IN_FLIGHT).",
            registry=reg,
        ),
        shed=Counter(
            "shapstream_requests_shed_total",
            "Requests refused with a 503 instead of queued: overload, deadline, or client gone.",
            ["reason"],
            registry=reg,
        ),
        idempotent_replays=Counter(
            "shapstream_idempotent_replays_total",
            "Repeated caller transaction ids answered with their first answer, by where it was "
            "found (memory of this gateway, or the store).",
            ["source"],
            registry=reg,
        ),
        claims_per_read=Histogram(
            "shapstream_claims_per_read",
            "Transaction ids per store read of claims: concurrent requests' reads coalesced.",
            buckets=BATCH_BUCKETS,
            registry=reg,
        ),
        dependency_up=Gauge(
            "shapstream_dependency_up",
            "1 while requests are let through to the dependency, 0 while its breaker is open.",
            ["dependency"],
            registry=reg,
        ),
        spooling=Gauge(
            "shapstream_spooling",
            "1 while decisions go to the gateway's local spool because Kafka does not ack.",
            registry=reg,
        ),
        spool_events=Gauge(
            "shapstream_spool_events",
            "Decisions in the local spool, waiting to be replayed to Kafka.",
            registry=reg,
        ),
        spool_bytes=Gauge(
            "shapstream_spool_bytes",
            "Bytes of the decisions in the local spool (bounded by SHAPSTREAM_SPOOL_MAX_BYTES).",
            registry=reg,
        ),
        spooled=Counter(
            "shapstream_spooled_total",
            "Decisions written to the local spool (fsync'd) instead of acknowledged by Kafka.",
            registry=reg,
        ),
        spool_replayed=Counter(
            "shapstream_spool_replayed_total",
            "Spooled decisions handed to Kafka (acknowledged) and removed from the spool.",
            registry=reg,
        ),
        spool_refusals=Counter(
            "shapstream_spool_refusals_total",
            "Decisions refused (503) because Kafka did not ack and the spool was full.",
            registry=reg,
        ),
        duplicate_events=Counter(
            "shapstream_duplicate_events_total",
            "Events whose transaction id a worker had already stored: 'same' (a copy, skipped) "
            "or 'conflict' (another request under that id, dead-lettered).",
            ["kind"],
            registry=reg,
        ),
        denials=Counter(
            "shapstream_access_denials_total",
            "Requests refused and noted for the access log, by its action: "
            "denied.unauthenticated (401), denied.forbidden (403), denied.not_found (404 on an "
            "explanation).",
            ["action"],
            registry=reg,
        ),
        build_info=_build_info(reg),
        model_info=Gauge(
            "shapstream_model_info",
            "1 for each model version this process holds: the versions a gateway serves, the "
            "versions a worker has loaded to explain with since it started.",
            ["name", "version"],
            registry=reg,
        ),
        additivity_error=Histogram(
            "shapstream_additivity_error",
            "Additivity error of each stored explanation: |base value + sum of attributions - "
            "margin|, in margin space (exact TreeSHAP stays near float rounding, ~1e-6).",
            buckets=ADDITIVITY_BUCKETS,
            registry=reg,
        ),
        population=_population_metrics(reg),
    )


def _population_metrics(reg: CollectorRegistry) -> PopulationMetrics:
    feature = ["model", "version", "feature"]
    return PopulationMetrics(
        drift_psi=Gauge(
            "shapstream_attribution_drift_psi",
            "Population stability index of today's attributions of a feature against the "
            "version's reference (binned on the reference's frozen edges).",
            feature,
            registry=reg,
        ),
        drift_js=Gauge(
            "shapstream_attribution_drift_js",
            "Jensen-Shannon distance (base 2, 0 to 1) of today's attributions of a feature "
            "against the reference.",
            feature,
            registry=reg,
        ),
        drift_ks=Gauge(
            "shapstream_attribution_drift_ks",
            "Kolmogorov-Smirnov statistic of today's attributions of a feature against the "
            "reference, on the binned distributions.",
            feature,
            registry=reg,
        ),
        drifting=Gauge(
            "shapstream_attribution_drifting",
            "1 when today's attributions of a feature drift from the reference by the service's "
            "rule (enough decisions, and PSI and KS both past their thresholds), else 0.",
            feature,
            registry=reg,
        ),
        input_drift_psi=Gauge(
            "shapstream_input_drift_psi",
            "Population stability index of today's input values of a feature against the "
            "reference's: a data shift, where the attribution drift may be a logic shift.",
            feature,
            registry=reg,
        ),
        ndcg=Gauge(
            "shapstream_importance_ndcg",
            "nDCG of today's global ranking of features (mean |attribution|) against the "
            "reference's ranking: 1 when the order of importance is unchanged.",
            ["model", "version"],
            registry=reg,
        ),
        decisions=Gauge(
            "shapstream_population_decisions",
            "Decisions of today (UTC) by outcome, from the stored aggregates.",
            ["model", "version", "outcome"],
            registry=reg,
        ),
        reasons=Gauge(
            "shapstream_population_reasons",
            "Denials of today (UTC) giving each reason family among their principal reasons.",
            ["model", "version", "family"],
            registry=reg,
        ),
        refreshed=Gauge(
            "shapstream_population_refreshed_timestamp_seconds",
            "When the population gauges were last computed (Unix time).",
            registry=reg,
        ),
    )


def _build_info(registry: CollectorRegistry) -> Gauge:
    gauge = Gauge(
        "shapstream_build_info",
        "1, labelled with the version of the shapstream package this process runs.",
        ["version"],
        registry=registry,
    )
    gauge.labels(version=package_version()).set(1)
    return gauge


def package_version() -> str:
    """The installed shapstream distribution's version ("unknown" when run from a bare tree)."""
    try:
        return metadata.version("shapstream")
    except metadata.PackageNotFoundError:
        return "unknown"
