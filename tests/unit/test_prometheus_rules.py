"""deploy/prometheus/alerts.yml and deploy/grafana/shapstream.json: promtool accepts the rules and
their unit tests pass, and every metric they query is one the service exposes.

promtool is Debian's (`make setup` installs the package prometheus, which ships it); PROMTOOL
names another, as for deploy/local/setup.sh.
"""

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.metrics import create_metrics, create_worker_probe_metrics

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
ALERT_TESTS = ROOT / "deploy/prometheus/alerts.test.yml"
DASHBOARD = ROOT / "deploy/grafana/shapstream.json"
PROMTOOL = Path(os.environ.get("PROMTOOL") or "/usr/bin/promtool")
# Every metric of the service carries the prefix; what follows it in PromQL is the name.
METRIC = re.compile(r"\bshapstream_[a-z0-9_]+")
# The series names prometheus_client writes for a family of each type.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}


@pytest.fixture(scope="module")
def promtool() -> Path:
    if not os.access(PROMTOOL, os.X_OK):
        pytest.fail(
            f"promtool is not at {PROMTOOL}: run `make setup` (it installs Debian's package "
            "prometheus, which ships it), or set PROMTOOL to a promtool binary"
        )
    return PROMTOOL


def _promtool(promtool: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(promtool), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _registered() -> tuple[dict[str, str], set[str]]:
    """The type of every metric family a gateway or a worker registers, by name; and every series
    name the service can expose, labelled families' included (registry.collect() lists those
    without samples until a child exists)."""
    metrics = create_metrics()
    create_worker_probe_metrics(metrics.registry)
    families: dict[str, str] = {}
    names: set[str] = set()
    sampled: set[str] = set()
    for family in metrics.registry.collect():
        families[family.name] = family.type
        names.update(family.name + suffix for suffix in SUFFIXES[family.type])
        sampled.update(sample.name for sample in family.samples)
    # The suffixes are prometheus_client's: whatever it wrote is among them.
    assert sampled <= names, sampled - names
    return families, names


FAMILIES, EXPOSED = _registered()


def test_the_exposed_names_are_those_of_the_metrics_module() -> None:
    assert FAMILIES["shapstream_additivity_error"] == "histogram"
    assert {
        "shapstream_additivity_error_bucket",
        "shapstream_dead_letters_total",
        "shapstream_http_request_seconds_bucket",
        "shapstream_population_refreshed_timestamp_seconds",
        "shapstream_worker_ready",
    } <= EXPOSED
    assert "shapstream_dead_letters" not in EXPOSED
    assert "shapstream_additivity_error" not in EXPOSED


def test_promtool_checks_the_rules(promtool: Path) -> None:
    done = _promtool(promtool, "check", "rules", ALERTS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_the_rules_pass_their_unit_tests(promtool: Path) -> None:
    done = _promtool(promtool, "test", "rules", ALERT_TESTS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def _rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_every_alert_has_a_severity_a_summary_and_a_description() -> None:
    rules = _rules()
    assert rules
    for rule in rules:
        assert "alert" in rule, rule
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]


def test_every_alert_is_tested() -> None:
    tested = {
        case["alertname"]
        for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    assert {rule["alert"] for rule in _rules()} == tested


def test_the_rules_query_only_exposed_metrics() -> None:
    for rule in _rules():
        used = set(METRIC.findall(rule["expr"]))
        assert used, f"{rule['alert']} queries no shapstream metric"
        assert used <= EXPOSED, f"{rule['alert']}: {sorted(used - EXPOSED)}"
        # What the annotations tell the reader to look at exists too (a histogram by its name).
        named = set(METRIC.findall(" ".join(rule["annotations"].values())))
        unknown = named - EXPOSED - set(FAMILIES)
        assert not unknown, f"{rule['alert']} names {sorted(unknown)}"


def _dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return document


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside (collapsed) rows included."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _targets() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in _panels(_dashboard()["panels"]):
        for target in panel.get("targets", []):
            yield panel, target


def test_the_dashboard_is_valid_json_with_unique_panel_ids() -> None:
    dashboard = _dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41
    ids = [panel["id"] for panel in _panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), ids
    queried = [panel for panel in _panels(dashboard["panels"]) if panel["type"] != "row"]
    assert queried
    assert all(panel.get("targets") for panel in queried)
    # Every query goes to the data source the viewer picks.
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel, target in _targets():
        assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_the_dashboard_queries_only_exposed_metrics() -> None:
    targets = list(_targets())
    assert targets
    for panel, target in targets:
        used = set(METRIC.findall(target["expr"]))
        assert used, f"{panel['title']} ({target['refId']}) queries no shapstream metric"
        assert used <= EXPOSED, f"{panel['title']}: {sorted(used - EXPOSED)}"


def test_the_dashboard_variables_query_exposed_metrics() -> None:
    variables = [v for v in _dashboard()["templating"]["list"] if v["type"] == "query"]
    assert {variable["name"] for variable in variables} >= {"model", "version"}
    for variable in variables:
        query = variable["query"]
        expr = query["query"] if isinstance(query, dict) else query
        used = set(METRIC.findall(expr))
        assert used, variable["name"]
        assert used <= EXPOSED, f"{variable['name']}: {sorted(used - EXPOSED)}"


def _promql(expr: str) -> str:
    """A dashboard query as Prometheus gets it: Grafana's variables replaced by values."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
    return re.sub(r"\$\{?\w+\}?", "x", expr)


def test_the_dashboard_queries_parse(promtool: Path, tmp_path: Path) -> None:
    # promtool has no parser of its own for one expression: each query becomes a recording rule.
    rules = [
        {"record": f"dashboard:panel_{panel['id']}:{target['refId']}", "expr": _promql(expr)}
        for panel, target in _targets()
        for expr in [target["expr"]]
    ]
    checked = tmp_path / "dashboard-rules.yml"
    checked.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = _promtool(promtool, "check", "rules", checked)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout
