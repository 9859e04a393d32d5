"""Waiting for a condition of a real server or process by polling it, never by sleeping blind."""

import asyncio
import inspect
from collections.abc import Awaitable, Callable


async def until(
    check: Callable[[], bool] | Callable[[], Awaitable[bool]],
    timeout_s: float,
    poll_s: float = 0.05,
) -> None:
    """Poll `check` (sync or async) until it holds; TimeoutError after `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        while True:
            held = check()
            if inspect.isawaitable(held):
                held = await held
            if held:
                return
            await asyncio.sleep(poll_s)
