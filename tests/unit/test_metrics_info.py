"""What /metrics says of the process: build and model info, names with units, true help texts."""

from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.metrics import create_metrics, package_version
from service.settings import Settings
from tests.api_client import MODELS, asgi_client, bearer, dev_key


async def test_the_gateway_reports_its_build_and_served_models(tmp_path: Path) -> None:
    settings = Settings(mode="embedded", data_dir=tmp_path, models_dir=MODELS)
    async with asgi_client(create_app(settings)) as client:
        served = (await client.get("/v1/models", headers=bearer(dev_key(tmp_path)))).json()
        exposition = (await client.get("/metrics")).text
    assert package_version() not in {"", "unknown"}
    assert f'shapstream_build_info{{version="{package_version()}"}} 1.0' in exposition
    models = [(m["name"], m["version"]) for m in served["models"]]
    assert models
    for name, version in models:
        assert f'shapstream_model_info{{name="{name}",version="{version}"}} 1.0' in exposition


def test_names_carry_their_unit_and_help_texts_hold_in_both_modes() -> None:
    exposition = generate_latest(create_metrics().registry).decode()
    families = {family.name: family for family in text_string_to_metric_families(exposition)}
    assert "shapstream_worker_lag" not in families
    lag = families["shapstream_worker_lag_events"].documentation
    assert "Kafka" in lag
    assert "embedded outbox" in lag
    dead = families["shapstream_dead_letters"].documentation
    assert "dead-letter topic (Kafka)" in dead
    assert "dead_letters table (embedded)" in dead
    commits = families["shapstream_commit_failures"].documentation
    assert "embedded" in commits
    published = families["shapstream_events_published"].documentation
    assert "outbox (embedded)" in published
