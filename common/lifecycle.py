"""Running a service: uvloop, signal handling that only sets an event, a bounded shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class Service(Protocol):
    name: str

    async def run(self) -> None:
        """Serve until `stop()` is called, then drain and return."""
        ...

    def stop(self) -> None:
        """Ask the service to stop; safe to call from a signal handler and more than once."""
        ...


async def serve(service: Service) -> None:
    """Run `service` until SIGINT/SIGTERM; the handlers only request a stop (they may interrupt a lock)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, service.stop)
    try:
        await service.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run_main(make: Callable[[], Coroutine[Any, Any, None]]) -> int:
    """Start the event loop (uvloop where available) and return a process exit code."""
    try:
        import uvloop

        uvloop.run(make())
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(make())
    except KeyboardInterrupt:
        return 0
    return 0


async def wait_or_timeout(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait for `event` at most `timeout_s`; True if it was set."""
    try:
        await asyncio.wait_for(event.wait(), timeout_s)
    except TimeoutError:
        return False
    return True
