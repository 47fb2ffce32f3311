"""Reading and admitting: entries come from the model queues (real-time streams listed first), from
this worker's own pending entries after a restart, and from dead peers (claimed after their idle
time); each is checked and queued in its lane, or answered at once when it cannot run."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from ectrans.common.keys import WORKER_GROUP, Keys
from ectrans.common.lifecycle import wait_or_timeout
from ectrans.common.outage import Outage
from ectrans.common.recovery import Entry, Reclaimer, dead_letter, read_group
from ectrans.common.redis_conn import BLOCK_MS, RedisClient, is_cluster
from ectrans.common.registry import ModelSpec
from ectrans.common.results import Fields, Finish, ResultWriter, error_record, now_ms, task_error_record
from ectrans.common.schemas import TASK_ID_RE, Reason, Task, TaskError, reply_to_of
from ectrans.common.split import check_split
from ectrans.services.worker.batcher import Pending
from ectrans.services.worker.completion import Completer
from ectrans.services.worker.lanes import WorkerState
from ectrans.services.worker.peers import Peers
from ectrans.services.worker.settings import WorkerSettings

logger = logging.getLogger(__name__)


@dataclass
class Reader:
    redis: RedisClient
    keys: Keys
    settings: WorkerSettings
    consumer: str
    state: WorkerState
    completer: Completer
    peers: Peers
    # Cursors over our own pending entries left by an earlier run under this name, per stream,
    # until read through: each history read counts as a delivery, so every entry is read once.
    _history: dict[str, str] = field(default_factory=dict)

    @property
    def writer(self) -> ResultWriter:
        return self.completer.writer

    def resume(self, stream: str) -> None:
        """Read our own pending entries of `stream` (an earlier run's) before new ones."""
        self._history[stream] = "0"

    def room(self) -> int:
        return self.settings.prefetch - self.state.local_backlog()

    def read_sets(self) -> list[list[str]]:
        """Streams read by one XREADGROUP each, real-time first: all at once on a single Redis; one
        model's pair per reader on a cluster, where one call cannot span slots (a model's streams
        share its hash tag)."""
        if not is_cluster(self.redis):
            return [list(self.state.streams)]
        by_model: dict[str, list[str]] = {}
        for stream, model in self.state.streams.items():
            by_model.setdefault(model, []).append(stream)
        return list(by_model.values())

    async def read_loop(self, streams: list[str], outage: Outage) -> None:
        while not self.state.stopping.is_set():
            if self.room() <= 0:
                self.state.room.clear()
                await self.state.room.wait()
                continue
            await outage.attempt(lambda: self.read_once(streams))

    async def read_once(self, streams: list[str], block_ms: int | None = BLOCK_MS) -> None:
        """One read of `streams` into the lanes, up to the room the prefetch leaves (none: no read)."""
        room = self.room()
        if room <= 0:
            return
        history = {s: cursor for s, cursor in self._history.items() if s in streams}
        # First our own pending entries (after a restart), then new ones.
        if history and await self._read_history(room, history):
            return
        for stream, entries in await read_group(
            self.redis, WORKER_GROUP, self.consumer, {s: ">" for s in streams}, count=room, block=block_ms
        ):
            await self.admit(stream, entries)

    async def _read_history(self, room: int, streams: dict[str, str]) -> int:
        """Entries read from our own history of `streams` (0: read through)."""
        got = dict(await read_group(self.redis, WORKER_GROUP, self.consumer, streams, count=room, block=None))
        for stream in streams:
            entries = got.get(stream, [])
            if entries:
                self._history[stream] = entries[-1][0]
                await self._admit_recovered(stream, entries)
            else:
                self._history.pop(stream, None)
        return sum(len(entries) for entries in got.values())

    async def _admit_recovered(self, stream: str, entries: list[Entry]) -> None:
        """Own pending entries after a restart: past the delivery limit they are dead-lettered."""
        reclaimer = self.reclaimer(stream)
        claimed = await reclaimer.split_by_deliveries(entries)
        await dead_letter(self.redis, self.keys, self.writer, stream, claimed.dead, consumer=self.consumer)
        await self.admit(stream, claimed.live)

    def reclaimer(self, stream: str) -> Reclaimer:
        return Reclaimer(
            self.redis,
            self.keys,
            stream,
            WORKER_GROUP,
            self.consumer,
            min_idle_ms=self.settings.claim_idle_ms,
            max_deliveries=self.settings.max_deliveries,
        )

    async def claim_loop(self, outage: Outage) -> None:
        """Take over the entries of dead peers, idle for `claim_idle_ms`, as the prefetch has room."""
        reclaimers = {stream: self.reclaimer(stream) for stream in self.state.streams}
        period = max(self.settings.claim_idle_ms / 2000, 0.05)
        while not await wait_or_timeout(self.state.stopping, period):
            await outage.attempt(lambda: self._claim(reclaimers))

    async def _claim(self, reclaimers: dict[str, Reclaimer]) -> None:
        for stream, reclaimer in reclaimers.items():
            room = self.room()
            if room <= 0:
                break
            claimed = await reclaimer.claim(room)
            await dead_letter(self.redis, self.keys, self.writer, stream, claimed.dead, consumer=self.consumer)
            await self.admit(stream, claimed.live)

    async def admit(self, stream: str, entries: list[Entry]) -> None:
        lane = self.state.lane_of(stream)
        tasks: list[tuple[str, Task]] = []
        broken: list[Finish] = []
        split_tokens: dict[str, int] = {}  # entry id → token count of a split task's payload
        if self.state.stopping.is_set():  # read while stopping: straight back to the group
            await self.peers.give_back(stream, [entry_id for entry_id, _ in entries])
            return
        for entry_id, raw in entries:
            if (stream, entry_id) in self.state.held:  # e.g. claimed back from ourselves after the idle time
                continue
            if not raw:  # deleted while pending: nothing to answer, just clear it
                broken.append(Finish(entry_id, {}, stream, entry_id))
                continue
            try:
                task = Task.from_fields(raw)
            except TaskError as err:
                broken.append(self._unreadable(stream, entry_id, raw, err))
                continue
            try:
                split_tokens[entry_id] = check_split(task, lane.spec).tokens if task.is_split else 0
            except TaskError as err:  # this worker's copy of the model differs from the dispatcher's
                record = task_error_record(task, err.reason, err.message)
                broken.append(Finish(task.id, record, stream, entry_id, task.reply_to))
                continue
            tasks.append((entry_id, task))
            self.state.held[(stream, entry_id)] = time.monotonic()
        queued: set[str] = set()
        too_long: list[Finish] = []
        try:
            if broken:  # answered, or only acknowledged where the entry is gone (empty record): one call
                await self.completer.write(broken)
            texts = [t.input for _, t in tasks if not t.is_split]
            counted = iter(lane.executor.count_tokens(texts) if texts else [])
            arrived = time.monotonic()
            for entry_id, task in tasks:
                tokens = split_tokens[entry_id] if task.is_split else next(counted)
                if not task.is_split and self._refuses_length(lane.spec, task, tokens):
                    record = self._too_long_record(lane.spec, task)
                    too_long.append(Finish(task.id, record, stream, entry_id, task.reply_to))
                    continue
                lane.batcher.add(Pending(entry_id, stream, task, min(tokens, lane.spec.max_tokens), arrived))
                queued.add(entry_id)
            if queued:
                lane.wakeup.set()
            if too_long:
                await self.completer.write(too_long)
        finally:
            # Whatever did not reach the local queues is not held: left pending, it is claimed again
            # (by a peer or by this worker after the idle time) instead of being skipped as ours.
            for entry_id, _ in tasks:
                if entry_id not in queued:
                    self.state.held.pop((stream, entry_id), None)

    def _unreadable(self, stream: str, entry_id: str, raw: dict[bytes, bytes], err: TaskError) -> Finish:
        """A queue entry that is no task (written by hand, or corrupted): answered under the task id
        it names, never under the queue's entry ID (which could be another task's result key), or
        only acknowledged, with a warning, when it names none."""
        task_id = raw.get(b"id", b"").decode("utf-8", "replace")
        if not TASK_ID_RE.match(task_id):
            logger.warning("[worker] unreadable entry %s of %s acknowledged: %s", entry_id, stream, err.message)
            return Finish(entry_id, {}, stream, entry_id)
        record = error_record(task_id, err.reason, err.message, submitted_ms=now_ms())
        return Finish(task_id, record, stream, entry_id, reply_to_of(raw))

    @staticmethod
    def _refuses_length(spec: ModelSpec, task: Task, tokens: int) -> bool:
        """Over the model's token limit, and neither the task nor the model entry allows cutting it."""
        return spec.kind != "noop" and tokens > spec.max_tokens and not (task.truncate or spec.truncate)

    @staticmethod
    def _too_long_record(spec: ModelSpec, task: Task) -> Fields:
        message = (
            f"input is longer than the {spec.max_tokens} tokens model {spec.name!r} takes; "
            "send truncate=1 with the task (or set truncate = true in the model entry) to cut it instead"
        )
        return task_error_record(task, Reason.BAD_INPUT, message)
