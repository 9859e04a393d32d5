"""What routes receive: the state the lifespan opened."""

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from service.core.breaker import Guard
from service.core.decisions import Decider
from service.core.keys import KeyVerifier
from service.core.registry import ModelRegistry
from service.metrics import Metrics
from service.ports import AccessStore, EventBus, ExplanationStore
from service.settings import Settings

STATE_KEY = "shapstream"


@dataclass(frozen=True)
class AppState:
    settings: Settings
    registry: ModelRegistry
    bus: EventBus
    store: ExplanationStore
    metrics: Metrics
    access: AccessStore
    keys: KeyVerifier
    decider: Decider
    # Deadline and circuit breaker of the store calls made while a client waits.
    store_guard: Guard


async def get_state(request: Request) -> AppState:
    # async: FastAPI runs a plain `def` dependency in a thread pool, a hop per request.
    state = getattr(request.state, STATE_KEY)
    assert isinstance(state, AppState)
    return state


State = Annotated[AppState, Depends(get_state)]
