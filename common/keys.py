"""Every Redis key, stream and consumer group ECTrans touches, in one place.

`grep` this module to find all Redis traffic. Per-model queues carry the model name as a hash tag
(`{minilm}`) so that, in a Redis Cluster, a model's real-time and batch streams share one slot.
"""

from __future__ import annotations

from dataclasses import dataclass

DISPATCHER_GROUP = "dispatchers"
WORKER_GROUP = "workers"
TASK_CLASSES = ("realtime", "batch")


@dataclass(frozen=True)
class Keys:
    """Key names under one configurable prefix (default `ectrans:`)."""

    prefix: str = "ectrans:"

    @property
    def tasks(self) -> str:
        """Ingress stream: clients and redis-cli XADD tasks here."""
        return f"{self.prefix}tasks"

    def queue(self, model: str, task_class: str) -> str:
        """Per-model stream of admitted tasks of one class (`realtime` or `batch`)."""
        short = "rt" if task_class == "realtime" else "batch"
        return f"{self.prefix}q:{{{model}}}:{short}"

    def result(self, task_id: str) -> str:
        """Hash holding a task's terminal record, kept for the result TTL."""
        return f"{self.prefix}result:{task_id}"

    def owner(self, task_id: str) -> str:
        """Which ingress entry owns client id `task_id` (its entry ID, set once at dispatch): a second
        task with the same id is answered `duplicate_id` instead of sharing the record. The whole
        result key is the hash tag, so on a Redis Cluster the mark shares the result's slot."""
        return f"{{{self.result(task_id)}}}:owner"

    def cancelled(self, task_id: str) -> str:
        """Marks a task its client gave up on (set with a TTL by `AsyncClient.cancel`): a worker that
        has not started it answers `cancelled` instead of running it."""
        return f"{self.prefix}cancel:{task_id}"

    def reply(self, client_id: str) -> str:
        """Per-client stream where terminal records are pushed for the client library (hash-tagged
        by the client, so that its `replied` marks share its slot)."""
        return f"{self.prefix}reply:{{{client_id}}}"

    def replied(self, client_id: str, task_id: str) -> str:
        """Cluster only: marks a task's record as pushed to its client's reply stream (same slot),
        so a finish repeated after a crash never pushes it twice."""
        return f"{self.prefix}replied:{{{client_id}}}:{task_id}"

    @property
    def metrics(self) -> str:
        """Stream of per-batch statistics from workers, read by the monitor."""
        return f"{self.prefix}metrics"

    @property
    def stats(self) -> str:
        """Hash the monitor keeps current for redis-cli users (`HGETALL ectrans:stats`)."""
        return f"{self.prefix}stats"

    @property
    def dead_letters(self) -> str:
        """Stream of tasks that exceeded the delivery limit, with their history."""
        return f"{self.prefix}dead"

    def heartbeat(self, service: str, instance: str) -> str:
        """Per-instance heartbeat hash with a TTL; its absence means the instance is gone."""
        return f"{self.prefix}hb:{service}:{instance}"

    @property
    def heartbeat_pattern(self) -> str:
        return f"{self.prefix}hb:*"

    def forwarded(self, model: str, task_id: str) -> str:
        """Marks a task as forwarded to its model's queues (cluster only: the forward step's dedupe
        key, in the queues' slot, so forwarding stays exactly-once without a MULTI across slots)."""
        return f"{self.prefix}fwd:{{{model}}}:{task_id}"

    @property
    def live(self) -> str:
        """Sorted set of heartbeat keys scored by their expiry (ms): who is alive, without a SCAN."""
        return f"{self.prefix}live"

    def claim_lock(self, stream: str) -> str:
        """Short-lived lock so that one consumer at a time runs XAUTOCLAIM on a stream."""
        return f"{stream}:claim-lock"

    def cost(self, model: str) -> str:
        """Hash with a model's fitted batch cost (written by workers, read for admission)."""
        return f"{self.prefix}cost:{{{model}}}"

    def profile(self, model: str) -> str:
        """Per-layer latency profile of a model, for the scheduler's cost model."""
        return f"{self.prefix}profile:{model}"
