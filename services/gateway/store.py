"""What the gateway answers, and logs, when Redis fails a request.

A lost or too slow connection (or a Redis out of memory) is a 503 `unavailable` with `Retry-After`:
trying again later can work. A command Redis refuses for another reason (`NOPERM` from an ACL that
lacks a right, `WRONGTYPE` from a key someone else wrote) is a 500: retrying cannot fix a
configuration error, and a 503 would send clients into endless retries while hiding it.

Logged once when it starts and once when it ends, not once per request: during an outage every
request fails alike, and a line each would flood the log (the metrics count the answers). And
answered at once while it lasts: a request that tries Redis waits out the connection's retries
(about 3 s), so only one request a second tries it (and finds when it is back).
"""

from __future__ import annotations

import logging
import time

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ectrans.common.schemas import Reason
from ectrans.services.gateway.errors import GatewayError

logger = logging.getLogger(__name__)
PROBE_EVERY_S = 1.0  # while Redis is unreachable, one request this often tries it


def retryable(exc: RedisError) -> bool:
    """Whether trying again later can succeed: a connection lost or slow, or Redis out of memory."""
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith("OOM")


class StoreHealth:
    """The gateway's view of Redis as its requests see it."""

    def __init__(self) -> None:
        self.down_since: float | None = None  # monotonic time of the first failure; None while it answers
        self._tried_at = 0.0  # when a request last tried Redis during an outage
        self._last_refusal: str | None = None  # the refusal last logged, until a request succeeds

    def failed(self, exc: RedisError) -> GatewayError:
        """The error to answer for `exc`, logged as the module docstring says."""
        if retryable(exc):
            self._tried_at = time.monotonic()  # the next try a second after this one gave up
            if self.down_since is None:
                self.down_since = self._tried_at
                logger.warning("[gateway] Redis unreachable (%s); answering 503 until it is back", exc)
            return unavailable()
        if str(exc) != self._last_refusal:
            self._last_refusal = str(exc)
            logger.error("[gateway] Redis refused a command (%s): check its ACL user and keys", exc)
        return GatewayError(500, f"the task store refused the request ({type(exc).__name__})", Reason.INTERNAL)

    def refusal(self) -> GatewayError | None:
        """The 503 to answer at once while Redis is unreachable, or None: the request may try it."""
        if self.down_since is None:
            return None
        now = time.monotonic()
        if now - self._tried_at < PROBE_EVERY_S:
            return unavailable()
        self._tried_at = now  # this request tries; the others keep their answer meanwhile
        return None

    def answered(self) -> None:
        """A request reached Redis: an outage, if any, is over."""
        if self.down_since is not None:
            logger.warning("[gateway] Redis reachable again after %.1fs", time.monotonic() - self.down_since)
            self.down_since = None
        self._last_refusal = None


def unavailable() -> GatewayError:
    return GatewayError(503, "the task store is unreachable", Reason.UNAVAILABLE, retry_after_s=1)
