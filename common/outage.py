"""Keeping a service loop alive through Redis outages and bugs, written once for every service.

A loop runs its steps through `Outage.attempt`. A lost connection (or one too slow to answer) is
logged once when it goes and once when it comes back, with how long it was gone; tries in between
are paced by a jittered, growing pause. After it, and after a Redis that restarted without our
consumer groups (NOGROUP), the loop's own recovery (rejoin the groups, reread a backlog) runs
before its next step. A refused command or a bug is logged (once while the same error repeats:
a READONLY replica or a full disk must not print a traceback every beat) and retried after a
pause: only a stop ends a service.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

logger = logging.getLogger(__name__)

NOGROUP_RETRIES = 3  # recoveries tried in a row before a NOGROUP is reported as an error


class Backoff:
    """Jittered pauses that double from `first_s` up to `max_s`; `reset()` after a success."""

    def __init__(self, first_s: float = 0.1, max_s: float = 1.0) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.delay_s = first_s

    def next_s(self) -> float:
        """The next pause: uniform in [delay / 2, delay], so many clients do not retry in step."""
        pause = random.uniform(self.delay_s / 2, self.delay_s)
        self.delay_s = min(self.delay_s * 2, self.max_s)
        return pause

    async def pause(self) -> None:
        await asyncio.sleep(self.next_s())

    def reset(self) -> None:
        self.delay_s = self.first_s


class Outage:
    """One loop's view of Redis: whether (and since when) it is lost, and what to do about it."""

    def __init__(
        self,
        what: str,
        *,
        recover: Callable[[], Awaitable[None]] | None = None,
        first_pause_s: float = 0.1,
        max_pause_s: float = 1.0,
        error_pause_s: float = 0.5,
        report: bool = True,
    ) -> None:
        self.what = what  # the loop's name in log lines
        self.recover = recover
        self.backoff = Backoff(first_pause_s, max_pause_s)
        self.error_pause_s = error_pause_s
        # A helper loop of a service whose main loop reports the outage logs it at DEBUG only.
        self.level = logging.WARNING if report else logging.DEBUG
        self.since: float | None = None  # monotonic time the connection was lost; None while up
        self._must_recover = False
        self._nogroups = 0  # NOGROUPs in a row: a recovery that does not fix them is reported
        self._last_error: str | None = None  # the error last logged, until a step succeeds

    async def attempt(self, step: Callable[[], Awaitable[object]]) -> bool:
        """Run `step` (after the loop's recovery, when Redis may have changed under it); True if it
        completed. A failure is logged as its kind asks and paused after, and False is returned."""
        try:
            if self._must_recover and self.recover is not None:
                await self.recover()
            self._must_recover = False
            await step()
        except (RedisConnectionError, RedisTimeoutError) as exc:  # unreachable, or too slow to answer
            self._lost(exc)
            self._must_recover = True
            await self.backoff.pause()
            return False
        except ResponseError as exc:
            if "NOGROUP" in str(exc) and self.recover is not None and self._nogroups < NOGROUP_RETRIES:
                self._nogroups += 1  # Redis restarted without persistence: rejoin, then go on
                self._must_recover = True
                await asyncio.sleep(self.backoff.first_s)
            else:
                self._error(exc, "Redis refused a command")
                await asyncio.sleep(self.error_pause_s)
            return False
        except RedisError as exc:
            self._error(exc, "Redis refused a command")
            await asyncio.sleep(self.error_pause_s)
            return False
        except Exception as exc:  # a bug (or a client-library error mid-reconnect) must not end the service
            self._error(exc, "unexpected error; carrying on")
            await asyncio.sleep(self.error_pause_s)
            return False
        self._back()
        self._nogroups = 0
        self._last_error = None
        return True

    def _error(self, exc: Exception, what: str) -> None:
        """The first of a run of the same error with its traceback; repeats at DEBUG."""
        key = f"{type(exc).__name__}: {exc}"
        if key == self._last_error:
            logger.debug("[%s] %s again: %s", self.what, what, key)
            return
        self._last_error = key
        logger.exception("[%s] %s", self.what, what)

    def _lost(self, exc: RedisError) -> None:
        if self.since is None:
            self.since = time.monotonic()
            logger.log(self.level, "[redis] %s lost the connection (%s); retrying with backoff", self.what, exc)

    def _back(self) -> None:
        if self.since is not None:
            logger.log(self.level, "[redis] %s connection back after %.1fs", self.what, time.monotonic() - self.since)
            self.since = None
            self.backoff.reset()
