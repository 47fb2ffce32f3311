"""Putting the ingress stream's last ID back after a client ran it far ahead of the clock.

`XADD ectrans:tasks <ID> ...` with an explicit ID is an ordinary XADD: no ACL can refuse it. An ID
far ahead makes every later `XADD *` take an ID after it, and the last possible one
(`18446744073709551615-18446744073709551615`) makes every later XADD fail ("The stream has exhausted
the last possible ID"): one entry would stop every client's submissions for good. So once the
dispatcher has answered such an entry and the stream is empty, it sets the stream's last ID (and its
group's) back to Redis's clock.

Only an ID further ahead than anything keyed by an entry ID can live (a result, its reply mark, a
forward mark: the result TTL plus the owner grace) is put back: the IDs handed out between the two
moments come round again only once everything keyed by them has expired.
"""

from __future__ import annotations

import logging

from redis.exceptions import ResponseError

from ectrans.common.lua import Lua
from ectrans.common.redis_conn import RedisClient
from ectrans.common.results import OWNER_GRACE_S, now_ms
from ectrans.common.schemas import entry_ms

logger = logging.getLogger(__name__)

# Margin for the clocks of Redis and the dispatcher's host, on top of the keys' lifetime.
CLOCK_MARGIN_S = 3600

REWIND_LUA = """
-- KEYS[1] ingress stream; ARGV[1] its consumer group. Only on an empty stream (every entry answered
-- and deleted): sets its last ID, and the group's, to the last possible ID of Redis's current
-- millisecond, so the next `XADD *` gets <next ms>-0, after every ID given out before the stream ran
-- ahead. Returns 1 when it did, 0 when entries are left (a later read tries again).
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('XLEN', KEYS[1]) > 0 then
  return 0
end
local now = redis.call('TIME')
local id = now[1] .. string.format('%03d', math.floor(tonumber(now[2]) / 1000)) .. '-18446744073709551615'
-- Redis >= 7.0 also keeps the largest deleted ID (the attacker's entry), which must not stay above
-- the new last ID; 6.2 knows no MAXDELETEDID and takes the plain form.
local set = redis.pcall('XSETID', KEYS[1], id, 'MAXDELETEDID', id)
if type(set) == 'table' and set.err then
  redis.call('XSETID', KEYS[1], id)
end
redis.pcall('XGROUP', 'SETID', KEYS[1], ARGV[1], id)
return 1
"""


class Rewinder:
    """Puts the ingress stream's last ID back (see the module docstring) after a read that held an
    entry this far ahead of the clock."""

    def __init__(self, redis: RedisClient, stream: str, group: str, result_ttl_s: int) -> None:
        self.redis = redis
        self.stream = stream
        self.group = group
        self.ahead_ms = (result_ttl_s + OWNER_GRACE_S + CLOCK_MARGIN_S) * 1000
        self._script = Lua(REWIND_LUA)
        self.rewound = 0

    def wanted(self, entry_id: str) -> bool:
        """Whether `entry_id` (the last of a read: the furthest ahead) is far enough ahead to put back."""
        return entry_ms(entry_id) > now_ms() + self.ahead_ms

    async def rewind(self) -> bool:
        """True when the stream's last ID was put back now; False while entries are left in it."""
        try:
            done = bool(await self._script.run(self.redis, [self.stream], [self.group]))
        except ResponseError as exc:  # a Redis refusing XSETID: the entry is answered; say so, go on
            logger.warning("[ingress] %s's last ID is far ahead and was not put back: %s", self.stream, exc)
            return False
        if done:
            self.rewound += 1
            logger.warning("[ingress] a client ran %s's entry IDs far ahead; its last ID is back at now", self.stream)
        return done
