"""Schemathesis against the service's own OpenAPI document (embedded mode, in process, with a key
holding every scope): no request it makes, valid or not, gets a server error, and every answer
matches the document (status codes, media types, bodies, headers; valid requests accepted,
invalid ones refused).

Run through schemathesis' engine, as `st run` does (examples, coverage, fuzzing and stateful
phases), with a fixed seed and a bounded number of examples: a few seconds. Its pytest loader
(`schemathesis.pytest.from_fixture`) does not work with pytest 9 (it sets `node._nodeid`).
"""

import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import schemathesis
from schemathesis.cli.commands.run.warnings import all_positive_are_rejected
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, events, from_schema
from schemathesis.engine.run import PhaseName
from schemathesis.python.asgi import shutdown_lifespans

from service.app import create_app
from service.settings import Settings
from tests.api_client import MODELS, ROOT, bearer, dev_key

EXAMPLES_PER_OPERATION = 25
# ?wait=S holds a request up to S seconds: the generated waits are cut to this.
MAX_WAIT_S = 0.05
# The rules a user's `st run` reads from the checkout, with a fixed seed and fewer examples.
CONFIG_FILE = ROOT / "schemathesis.toml"
RUN = {"seed": 9, "generation": {"max-examples": EXAMPLES_PER_OPERATION, "mode": "all"}}


def _short_waits(_: Any, query: dict[str, Any] | None) -> dict[str, Any] | None:
    wait = (query or {}).get("wait")
    if query and isinstance(wait, int | float) and not isinstance(wait, bool) and wait > MAX_WAIT_S:
        query["wait"] = MAX_WAIT_S
    return query


def _failure(event: events.ScenarioFinished, case_id: str, check: Any) -> str:
    case = event.recorder.cases[case_id].value
    interaction = event.recorder.interactions.get(case_id)
    response = interaction.response if interaction is not None else None
    answer = f"{response.status_code} {response.content[:300]!r}" if response else "no response"
    title = check.failure_info.failure.title if check.failure_info else check.status
    return (
        f"{check.name} ({title}): {case.method} {case.formatted_path} query={case.query} "
        f"body={str(case.body)[:300]} -> {answer}"
    )


def test_the_api_matches_its_document(tmp_path: Path) -> None:
    app = create_app(Settings(mode="embedded", data_dir=tmp_path, models_dir=MODELS))
    config = SchemathesisConfig.from_dict({**tomllib.loads(CONFIG_FILE.read_text()), **RUN})
    # Loading the document runs the app's lifespan (in schemathesis' event loop thread), so it
    # describes the served models.
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    failures: list[str] = []
    requests: Counter[str] = Counter()
    refused_all: set[str] = set()
    try:
        schema.config.update(headers=bearer(dev_key(tmp_path)))
        schema.hook("map_query")(_short_waits)
        for event in from_schema(schema).execute():
            if isinstance(event, events.NonFatalError | events.FatalError):
                failures.append(f"{type(event).__name__}: {getattr(event, 'value', event)!r}")
            if not isinstance(event, events.ScenarioFinished):
                continue
            requests[event.recorder.label] += len(event.recorder.interactions)
            # `st run` warns of a "schema validation mismatch" when an operation's every
            # schema-valid request was refused (stateful scenarios are sequences, not judged).
            if event.phase != PhaseName.STATEFUL_TESTING and all_positive_are_rejected(
                event.recorder
            ):
                refused_all.add(f"{event.phase.value}: {event.recorder.label}")
            for case_id, checks in event.recorder.checks.items():
                failures += [
                    _failure(event, case_id, c) for c in checks if c.status != Status.SUCCESS
                ]
    finally:
        shutdown_lifespans()
    assert not failures, "\n".join(failures[:20])
    assert not refused_all, f"every schema-valid request refused in {sorted(refused_all)}"
    # Every operation was exercised; those with inputs, many times.
    for path, methods in schema.raw_schema["paths"].items():
        for method, operation in methods.items():
            with_inputs = "parameters" in operation or "requestBody" in operation
            least = EXAMPLES_PER_OPERATION if with_inputs else 1
            assert requests[f"{method.upper()} {path}"] >= least, (method, path, dict(requests))
