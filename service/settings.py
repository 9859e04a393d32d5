"""All configuration, from environment variables prefixed SHAPSTREAM_."""

from pathlib import Path
from typing import Literal, Self

from platformdirs import user_data_path
from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Regulation B (12 CFR 1002.12) keeps credit records at least 25 months; default is 7 years.
DEFAULT_RETENTION_DAYS = 7 * 365 + 2
# 25 months in days, never short of 25 calendar months: 25 x 30.5 = 762.5, and no 25 months
# run longer than 762 days (two years with a leap day, 731, plus a 31-day month).
MIN_RETENTION_DAYS = 762


def _default_data_dir() -> Path:
    return user_data_path("shapstream", appauthor=False)


class KafkaSettings(BaseModel):
    bootstrap: str = "127.0.0.1:19092"
    topic: str = "shapstream.decisions"
    dead_letter_topic: str = "shapstream.decisions.dead-letter"
    group_id: str = "shapstream-explainers"
    partitions: int = Field(default=6, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    # aiokafka can wait forever on a dead broker (aio-libs/aiokafka#1101): bound every publish.
    publish_timeout_s: float = Field(default=5.0, gt=0)
    # How long a decision waits for Kafka's acknowledgement before it goes to the local spool
    # instead (and every decision after it, until the spool has been replayed). Kafka acks in
    # milliseconds when healthy; waiting longer only turns a broker stall into queued requests.
    spool_after_s: float = Field(default=0.5, gt=0)
    linger_ms: int = Field(default=0, ge=0)
    # A worker's fetch waits (in the broker) for this many bytes or this long, whichever comes
    # first: at 1,000 decisions/s, ~50 events a batch instead of a few, which costs each
    # explanation up to this much freshness and saves the worker, Kafka and Cassandra the
    # per-batch work (requests, commits) for most of them.
    fetch_min_bytes: int = Field(default=64 * 1024, ge=1)
    fetch_max_wait_ms: int = Field(default=50, ge=0)


class SpoolSettings(BaseModel):
    """The gateway's durable local spool, written while Kafka does not acknowledge."""

    enabled: bool = True
    # One spool per gateway process, on a persistent volume: whatever is in it at a restart is
    # replayed to Kafka then. Default: <data_dir>/spool.
    dir: Path | None = None
    # Past this, decisions are refused (503) instead of spooled; ~1 M decisions of ~1 kB.
    max_bytes: int = Field(default=1 << 30, ge=1)


class CassandraSettings(BaseModel):
    hosts: str = "127.0.0.1:19042"
    keyspace: str = "shapstream"
    replication_factor: int = Field(default=1, ge=1)
    local_dc: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    # Partitions of the by-day table per (model version, day). At 1,000 decisions/s a day holds
    # 86.4 M rows of ~1.1 kB uncompressed (measured): 2,048 buckets keep each near 46 MB, well
    # under Cassandra's 100 MB guideline. Never change it once a keyspace holds data: readers
    # scan buckets 0..N-1.
    day_buckets: int = Field(default=2048, ge=1, le=65536)
    write_concurrency: int = Field(default=64, ge=1)
    request_timeout_s: float = Field(default=10.0, gt=0)
    # Deadline of the reads and writes a gateway makes while a client waits (claims, API keys):
    # a stalled node must cost a request a fraction of its own deadline, not the whole of it.
    fast_timeout_s: float = Field(default=0.5, gt=0)


class WorkerSettings(BaseModel):
    batch_max: int = Field(default=512, ge=1)
    batch_timeout_ms: int = Field(default=20, ge=0)
    engine: Literal["auto", "pred_contribs"] = "auto"
    model_cache: int = Field(default=8, ge=1)
    # GET /healthz fails once the consume loop has not completed an iteration (a batch, an
    # empty poll, a retry attempt) for this long. Legitimate waits are far shorter: retry
    # back-off caps at 30 s, a commit at 30 s, a store request at its timeout. Raise it if one
    # batch of your largest model takes longer than this to explain.
    stall_after_s: float = Field(default=120.0, gt=0)
    # Transaction ids a worker remembers having stored, to skip later copies of their events
    # (~250 bytes each): at 1,000 decisions/s, 100,000 cover the last 100 s of the log.
    first_events: int = Field(default=100_000, ge=0)
    # Keep the population aggregates (importance, drift, reasons) as decisions are written.
    population: bool = True


class SecuritySettings(BaseModel):
    # How long a verified API key is trusted without asking the store again: a revoked key
    # keeps working for at most this long in each gateway process (see service/core/keys.py).
    key_cache_s: float = Field(default=30.0, ge=0)
    # While the store cannot be asked, a key verified less than this long ago stays trusted,
    # so an outage of the store does not lock every client out.
    key_stale_s: float = Field(default=900.0, ge=0)


class GatewaySettings(BaseModel):
    """Load shedding and deadlines of the gateway (see service/api/middleware.py)."""

    # Requests under /v1/ being served at once; above it, 503 with Retry-After at once.
    max_in_flight: int = Field(default=256, ge=1)
    # No decision is answered later than this after it arrived: past it, 503 (retry, same id).
    decision_timeout_s: float = Field(default=2.0, gt=0)
    # Caller transaction ids answered recently, kept in memory so a repeat costs no store read.
    recent_ids: int = Field(default=100_000, ge=0)
    recent_ids_ttl_s: float = Field(default=600.0, gt=0)
    # The store is given up on after this many failures in a row, for `store_open_s` seconds.
    store_failures_to_open: int = Field(default=3, ge=1)
    store_open_s: float = Field(default=1.0, gt=0)
    # How often today's population gauges (drift, nDCG, outcomes, reasons) are recomputed from
    # the stored aggregates: one partition read per served version.
    population_refresh_s: float = Field(default=60.0, gt=0)


class ConsoleSettings(BaseModel):
    """The web console (service/api/ui): sessions, and what its adverse-action notices print."""

    # A signed-in browser's session lasts this long from sign-in, then asks for the key again.
    session_ttl_s: int = Field(default=3600, ge=60, le=7 * 24 * 3600)
    # Signs session cookies. Unset: a random secret per process, so sessions end at a restart
    # and each gateway process has its own; set one (32+ characters) shared by every replica
    # behind a load balancer.
    session_secret: SecretStr | None = Field(default=None, min_length=32)
    # Bars of the waterfall before the rest are grouped as "N other features" (shap's default).
    max_bars: int = Field(default=10, ge=2, le=100)
    # The creditor and its regulator, as Regulation B (12 CFR 1002.9) has a notice name them.
    lender_name: str = "Demo Lender"
    lender_address: str = "1 Example Street, Springfield"
    regulator: str = "Consumer Financial Protection Bureau, 1700 G Street NW, Washington, DC 20552"


class Settings(BaseSettings):
    """One settings object per process, built in `main()` or `create_app()`, never at import."""

    model_config = SettingsConfigDict(
        env_prefix="SHAPSTREAM_",
        env_nested_delimiter="_",
        env_nested_max_split=1,
        extra="ignore",
    )

    mode: Literal["kafka", "embedded"] = "kafka"
    models_dir: Path = Path("models")
    default_model: str | None = None
    data_dir: Path = Field(default_factory=_default_data_dir)
    retention_days: int = Field(default=DEFAULT_RETENTION_DAYS, ge=1)
    # Allows a retention below Regulation B's minimum (tests, non-credit models); never a default.
    retention_override: bool = False
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    kafka: KafkaSettings = KafkaSettings()
    cassandra: CassandraSettings = CassandraSettings()
    worker: WorkerSettings = WorkerSettings()
    security: SecuritySettings = SecuritySettings()
    spool: SpoolSettings = SpoolSettings()
    gateway: GatewaySettings = GatewaySettings()
    console: ConsoleSettings = ConsoleSettings()

    @property
    def spool_dir(self) -> Path:
        return self.spool.dir if self.spool.dir is not None else self.data_dir / "spool"

    @model_validator(mode="after")
    def _retention_meets_regulation_b(self) -> Self:
        if self.retention_days < MIN_RETENTION_DAYS and not self.retention_override:
            raise ValueError(
                f"retention_days={self.retention_days} is below Regulation B's minimum of "
                f"{MIN_RETENTION_DAYS} days (25 months, 12 CFR 1002.12(b)); raise it, or set "
                "retention_override=true (SHAPSTREAM_RETENTION_OVERRIDE) to keep records shorter"
            )
        return self
