"""The dispatcher service: ingress stream → validated, classified tasks in per-model queues."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from dataclasses import dataclass

from ectrans.common.cost import CostModel, estimate_tokens, predict_realtime_ms
from ectrans.common.heartbeat import METRICS_MAXLEN, Heartbeat, default_instance
from ectrans.common.keys import DISPATCHER_GROUP, TASK_CLASSES, Keys
from ectrans.common.outage import Outage
from ectrans.common.recovery import Entry, Reclaimer, dead_letter, ensure_group, read_group
from ectrans.common.redis_conn import BLOCK_MS, RedisClient, connect
from ectrans.common.registry import ModelSpec, RegistryError
from ectrans.common.results import Finish, ResultWriter, error_record, now_ms, task_error_record
from ectrans.common.schemas import (
    Reason,
    Task,
    TaskError,
    entry_ms,
    is_client_id,
    parse_task,
    reply_to_of,
    task_id_of,
)
from ectrans.common.split import check_split
from ectrans.models.generation_params import GenerationLimits, parse_generation_params
from ectrans.services.dispatcher.classify import ClassPolicy, classify
from ectrans.services.dispatcher.forwarding import Forwarder, Forwarding
from ectrans.services.dispatcher.placement import Placement
from ectrans.services.dispatcher.rewind import Rewinder
from ectrans.services.dispatcher.settings import DispatcherSettings
from ectrans.services.dispatcher.shedding import QueueLimit, WorkLimits

logger = logging.getLogger(__name__)


@dataclass
class Forward:
    task: Task
    queue: str
    entry_id: str
    tokens: int  # the task's size for admission: estimated from its text, or a split payload's count


class Dispatcher:
    """Reads `ectrans:tasks` in a consumer group; forwards or answers every entry exactly once."""

    name = "dispatcher"

    def __init__(
        self,
        settings: DispatcherSettings,
        registry: dict[str, ModelSpec],
        redis: RedisClient | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.keys: Keys = settings.keys
        self.consumer = settings.instance or default_instance()
        self.policy = ClassPolicy(settings.realtime_deadline_ms, settings.realtime_max_chars, settings.default_class)
        self.limits = settings.limits  # built once: `settings.limits` makes a new object per call
        self.generation = {name: generation_limits(spec) for name, spec in registry.items() if spec.kind == "seq2seq"}
        self._own_redis = redis is None
        self.redis = redis or connect(settings.redis_url, client_name=f"ectrans-dispatcher-{self.consumer}")
        self.writer = ResultWriter(self.redis, self.keys, DISPATCHER_GROUP, settings.result_ttl_s)
        # On a Redis Cluster forward + ack cannot share a MULTI: idempotent steps per slot instead.
        self.forwarder = Forwarder(self.redis, self.keys, self.keys.tasks, DISPATCHER_GROUP, settings.result_ttl_s)
        self.placement = Placement(
            self.redis,
            self.keys,
            sorted(registry),
            consumer=f"dispatcher-{self.consumer}",  # never a worker's name in the workers' group
            grace_s=settings.unavailable_after_s,
            result_ttl_s=settings.result_ttl_s,
        )
        self.work_limits = WorkLimits(
            self.redis,
            self.keys,
            sorted(registry),
            max_entries=settings.max_queue_len,
            max_seconds={"realtime": settings.realtime_max_queue_s, "batch": settings.batch_max_queue_s},
            workers=self._live_workers,
        )
        self.reclaimer = Reclaimer(
            self.redis,
            self.keys,
            self.keys.tasks,
            DISPATCHER_GROUP,
            self.consumer,
            min_idle_ms=settings.claim_idle_ms,
            max_deliveries=settings.max_deliveries,
        )
        self.rewinder = Rewinder(self.redis, self.keys.tasks, DISPATCHER_GROUP, settings.result_ttl_s)
        self.heartbeat = Heartbeat(
            self.redis,
            self.keys,
            self.name,
            self.consumer,
            interval_s=settings.heartbeat_s,
            extra=self._counters,
        )
        self._stopping = asyncio.Event()
        self._backlog = True  # after a restart, our own pending entries come first
        self._next_claim = 0.0  # when to claim idle entries next (set when serving starts)
        self.forwarded = 0
        self.rejected = 0

    def stop(self) -> None:
        self._stopping.set()

    def _live_workers(self, model: str) -> int:
        state = self.placement.models.get(model)
        return len(state.instances) if state else 0

    def _counters(self) -> dict[str, int]:
        return {"forwarded": self.forwarded, "rejected": self.rejected}

    async def run(self) -> None:
        logger.info("[start] dispatcher %s serving models: %s", self.consumer, ", ".join(sorted(self.registry)))
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.heartbeat.run(self._stopping))
                tg.create_task(self._serve())
                tg.create_task(self.placement.run(self._stopping))
                tg.create_task(self.work_limits.run(self._stopping))
        finally:
            if self._own_redis:
                await self.redis.aclose()
        logger.info("[shutdown] dispatcher %s stopped", self.consumer)

    async def step(self) -> bool:
        """One read → classify → admit → commit pass, without the background loops (heartbeat,
        placement refresh, takeover of dead peers' entries) and without blocking: this consumer's
        own pending entries first, as after a restart, else what is new. True when there were
        entries. Tests drive the dispatcher's logic with it one read at a time, no `run()` needed."""
        if await self._serve_backlog():
            return True
        entries = await self._read(">", None)
        await self.dispatch(entries)
        return bool(entries)

    async def _serve(self) -> None:
        outage = Outage("dispatcher", recover=self._reread_backlog)
        self._next_claim = time.monotonic() + self.settings.claim_idle_ms / 1000
        while not self._stopping.is_set():
            # A bug must not stop the node: the entries stay pending and are retried, then dead-lettered.
            await outage.attempt(self._serve_once)

    async def _serve_once(self) -> None:
        try:
            if self._backlog:
                self._backlog = await self._serve_backlog()
            else:
                await self._serve_new()
        except Exception:
            # What was read and not forwarded is pending under our name: read it again next, not
            # after the claim idle time (an outage's recovery does the same).
            self._backlog = True
            raise
        if time.monotonic() >= self._next_claim:
            self._next_claim = time.monotonic() + self.settings.claim_idle_ms / 2000
            await self._serve_claimed()

    async def _reread_backlog(self) -> None:
        """After an outage: what was read but not forwarded is taken back now, not after the claim
        idle time (the backlog read also creates the group again if Redis lost it)."""
        self._backlog = True

    async def _read(self, start_id: str, block: int | None) -> list[Entry]:
        if start_id == "0":  # first read after a (re)start: the group may not exist yet
            await ensure_group(self.redis, self.keys.tasks, DISPATCHER_GROUP)
        got = await read_group(
            self.redis, DISPATCHER_GROUP, self.consumer, {self.keys.tasks: start_id}, count=self.settings.read_count,
            block=block,
        )  # fmt: skip
        return got[0][1] if got else []

    async def _serve_backlog(self) -> bool:
        entries = await self._read("0", None)
        if not entries:
            return False
        claimed = await self.reclaimer.split_by_deliveries(entries)
        await dead_letter(self.redis, self.keys, self.writer, self.keys.tasks, claimed.dead, consumer=self.consumer)
        await self.dispatch(claimed.live)
        return True

    async def _serve_new(self) -> None:
        entries = await self._read(">", BLOCK_MS)
        await self.dispatch(entries)

    async def _serve_claimed(self) -> None:
        claimed = await self.reclaimer.claim(self.settings.read_count)
        await dead_letter(self.redis, self.keys, self.writer, self.keys.tasks, claimed.dead, consumer=self.consumer)
        await self.dispatch(claimed.live)

    def decide(self, entry_id: str, raw: dict[bytes, bytes]) -> Forward | Finish:
        """Validate and classify one entry: a forward to a queue, or an error result."""
        try:
            task = parse_task(entry_id, raw, self.limits)
            if task.submitted_ms > (now := now_ms()):
                # A client's XADD with an explicit ID ahead of the clock moves every later entry's
                # ID ahead too: those tasks' deadlines and latencies count from now instead.
                task = dataclasses.replace(task, submitted_ms=now)
            spec = self.registry.get(task.model)
            if spec is None:
                known = ", ".join(sorted(self.registry))
                raise TaskError(Reason.UNKNOWN_MODEL, f"unknown model {task.model!r:.80}; this node serves: {known}")
            if not spec.supports(task.op):
                ops = ", ".join(sorted(spec.ops))
                raise TaskError(Reason.UNKNOWN_OP, f"model {task.model!r} has no op {task.op!r:.40}; ops: {ops}")
            if task.params:
                self._check_generation(task)
            tokens = check_split(task, spec).tokens if task.is_split else estimate_tokens(task.input)
        except TaskError as err:
            task_id = task_id_of(entry_id, raw)
            record = error_record(task_id, err.reason, err.message, submitted_ms=entry_ms(entry_id))
            return Finish(task_id, record, self.keys.tasks, entry_id, reply_to_of(raw))
        # From here the task's model and class are known: its error record (and the monitor's
        # figures, the Prometheus labels) name them, as for an `overloaded` one.
        task = task.classified(classify(task, self.policy))
        forward = Forward(task, self.keys.queue(task.model, task.task_class), entry_id, tokens)
        if self.placement.unavailable(task.model):
            return self._reject(forward, Reason.UNAVAILABLE, self.placement.message(task.model))
        deadline = task.deadline_at_ms
        if deadline is not None and now_ms() >= deadline:
            return self._reject(forward, Reason.DEADLINE, "deadline passed before the task was dispatched")
        return forward

    def _check_generation(self, task: Task) -> None:
        """A task's generation settings within its model's own limits: one clear error now, naming the
        model, rather than the worker's after the task has queued (`bad_input` either way)."""
        limits = self.generation.get(task.model)
        if limits is None:
            return
        try:
            parse_generation_params(task.params, limits)
        except ValueError as exc:
            raise TaskError(Reason.BAD_INPUT, f"model {task.model!r}: {exc}") from None

    async def dispatch(self, entries: list[Entry]) -> None:
        if not entries:
            return
        decisions = [self.decide(eid, raw) for eid, raw in entries]
        if self.writer.cluster:
            decisions = await self._claim_ids(decisions)
            decisions = await self._admit(decisions)
        else:  # the commit script claims the forwards' ids; admission's error results are claimed here
            decisions = await self._admit(decisions)
            decisions = await self._claim_ids(decisions, forwards=False)
        forwards = [d for d in decisions if isinstance(d, Forward)]
        finishes = [d for d in decisions if isinstance(d, Finish)]
        for forward in forwards:
            self.work_limits.observe(forward.queue, forward.tokens)
        held = 0
        if self.writer.cluster:
            await asyncio.shield(self._commit_per_slot(forwards, finishes))
        else:
            held = await asyncio.shield(self._commit(forwards, finishes))
        self.rejected += len(finishes) + held
        self.forwarded += len(forwards) - held
        if self.rewinder.wanted(entries[-1][0]):  # a client XADDed an ID far ahead (see rewind.py)
            await self.rewinder.rewind()

    async def _claim_ids(self, decisions: list[Forward | Finish], *, forwards: bool = True) -> list[Forward | Finish]:
        """Every task naming a client id claims it (see `ResultWriter.claim`) before anything is written
        under it: a task whose id another task owns is answered `duplicate_id` under its own entry ID,
        so it can neither take nor overwrite the owner's record.

        With `forwards=False` (a single Redis, where the commit script claims the forwards' ids) only
        the error results claim here, and the forwards naming one of their ids, so that within a read
        the first entry to name an id still owns it. A read with no such error result costs no call."""
        ids = [d.task.id if isinstance(d, Forward) else d.task_id for d in decisions]
        if forwards:
            wanted = [is_client_id(task_id) for task_id in ids]
        else:
            finished = {t for d, t in zip(decisions, ids, strict=True) if isinstance(d, Finish) and is_client_id(t)}
            wanted = [task_id in finished for task_id in ids]
        if not any(wanted):
            return decisions
        claims = [(t, d.entry_id) for d, t, w in zip(decisions, ids, wanted, strict=True) if w]
        owned = iter(await self.writer.claim(claims))
        return [self._duplicate(d) if w and not next(owned) else d for d, w in zip(decisions, wanted, strict=True)]

    def _duplicate(self, decision: Forward | Finish) -> Finish:
        if isinstance(decision, Forward):
            task = decision.task
            task_id, reply_to, model, op, task_class = task.id, task.reply_to, task.model, task.op, task.task_class
        else:
            task_id, reply_to = decision.task_id, decision.reply_to
            model, op = _text(decision.record.get("model", "")), _text(decision.record.get("op", ""))
            task_class = _text(decision.record.get("class", ""))
        entry_id = decision.entry_id
        message = f"id {task_id!r} belongs to another task; this one is answered under its entry ID {entry_id}"
        record = error_record(
            entry_id,
            Reason.DUPLICATE_ID,
            message,
            submitted_ms=entry_ms(entry_id),
            task_class=task_class,
            model=model,
            op=op,
        )
        record["requested_id"] = task_id
        return Finish(entry_id, record, self.keys.tasks, entry_id, reply_to)

    async def _commit(self, forwards: list[Forward], finishes: list[Finish]) -> int:
        """Single Redis: claims of the forwards' ids, forwards, error results, their metrics and the acks
        in one script call (a crash leaves all or nothing done; one call per read instead of three
        commands per task). The script claims each forward's client id, then checks its queue's
        length limit as it appends; the duplicates and the refused forwards (left pending) are
        answered in a second call, `duplicate_id` and `overloaded`. Returns how many were held back."""
        items = [_forwarding(d) for d in forwards]
        metrics = self._rejection_metrics(finishes)
        limits = {d.queue: self._queue_limit(d).entries for d in forwards}
        held = await self.forwarder.commit(items, finishes, self.writer, metrics, limit=limits)
        if not held:
            return 0
        refused, duplicates = set(held.refused), set(held.duplicates)
        answers = [
            self._duplicate(d) if d.entry_id in duplicates else self._overloaded(d)
            for d in forwards
            if d.entry_id in duplicates or d.entry_id in refused
        ]
        await self.forwarder.commit([], answers, self.writer, self._rejection_metrics(answers))
        return len(answers)

    async def _commit_per_slot(self, forwards: list[Forward], finishes: list[Finish]) -> None:
        """The cluster's dispatch: forwards (deduped in the queue's slot, then acked), error results
        (idempotent, then acked), then the rejection metrics (best effort, after the results)."""
        await self.forwarder.forward([_forwarding(d) for d in forwards])
        await self.writer.write(finishes)
        if finishes:
            pipe = self.redis.pipeline(transaction=False)
            for fields in self._rejection_metrics(finishes):
                pipe.xadd(self.keys.metrics, dict(fields), maxlen=METRICS_MAXLEN, approximate=True)  # type: ignore[arg-type]
            await pipe.execute()

    def _rejection_metrics(self, rejected: list[Finish]) -> list[dict[str, str]]:
        """One `kind=errors` metrics entry per (model, class), written with the error results, so the
        monitor counts each rejection exactly once."""
        by_class: Counter[tuple[str, str, str]] = Counter()
        for finish in rejected:
            record = {k: v.decode() if isinstance(v, bytes) else v for k, v in finish.record.items()}
            by_class[(record.get("model", ""), record.get("class", ""), record.get("reason", ""))] += 1
        grouped: dict[tuple[str, str], list[str]] = {}
        for (model, task_class, reason), count in by_class.items():
            grouped.setdefault((model, task_class), []).append(f"{reason}:{count}")
        return [
            {"kind": "errors", "model": model, "class": task_class, "reasons": ",".join(reasons),
             "dispatcher": self.consumer}
            for (model, task_class), reasons in grouped.items()
        ]  # fmt: skip

    async def _admit(self, decisions: list[Forward | Finish]) -> list[Forward | Finish]:
        """Admission: a real-time task predicted to miss its deadline is rejected (or downgraded to
        batch when it asked `on_miss=batch`); a task bound for a full queue (in entries, or in seconds
        of work: see `shedding.py`) gets `overloaded` at once.

        On a single Redis the commit script checks the queue limit itself, at the moment it appends,
        so the queue lengths and costs are read here (one round trip) only for a read holding a
        real-time task with a deadline, whose latency must be predicted."""
        forwards = [d for d in decisions if isinstance(d, Forward)]
        if not forwards:
            return decisions
        if not self.writer.cluster and not any(_predicted(d.task) for d in forwards):
            return decisions
        models = sorted({d.task.model for d in forwards})
        queues = sorted({self.keys.queue(m, c) for m in models for c in TASK_CLASSES})
        pipe = self.redis.pipeline(transaction=False)
        for queue in queues:
            pipe.xlen(queue)
        for model in models:
            pipe.hgetall(self.keys.cost(model))
        replies = await pipe.execute()
        lengths: dict[str, int] = dict(zip(queues, replies[: len(queues)], strict=True))
        costs = {
            m: CostModel.from_fields({k.decode(): v.decode() for k, v in raw.items()})
            for m, raw in zip(models, replies[len(queues) :], strict=True)
        }
        result: list[Forward | Finish] = []
        for decided in decisions:
            decision = decided
            if isinstance(decision, Forward):
                decision = self._admit_one(decision, costs.get(decision.task.model), lengths)
            if isinstance(decision, Forward):
                lengths[decision.queue] += 1
            result.append(decision)
        return result

    def _admit_one(self, forward: Forward, cost: CostModel | None, lengths: dict[str, int]) -> Forward | Finish:
        task = forward.task
        deadline = task.deadline_at_ms
        if task.task_class == "realtime" and deadline is not None and cost is not None:
            # A model queue's length counts its waiting and in-flight entries (acked ones are deleted).
            bulk_busy = lengths[self.keys.queue(task.model, "batch")] > 0
            predicted = predict_realtime_ms(cost, forward.tokens, lengths[forward.queue], bulk_busy)
            remaining = deadline - now_ms()
            if predicted > remaining:
                if task.on_miss != "batch":
                    message = f"predicted latency {predicted:.0f} ms exceeds the {remaining} ms left to the deadline"
                    return self._reject(forward, Reason.DEADLINE, message)
                task = task.classified("batch", downgraded=True)
                forward = Forward(task, self.keys.queue(task.model, "batch"), forward.entry_id, forward.tokens)
        if lengths[forward.queue] >= self._queue_limit(forward).entries:
            return self._overloaded(forward)
        return forward

    def _queue_limit(self, forward: Forward) -> QueueLimit:
        return self.work_limits.limit(forward.task.model, forward.task.task_class, forward.queue)

    def _overloaded(self, forward: Forward) -> Finish:
        return self._reject(forward, Reason.OVERLOADED, self._queue_limit(forward).message(forward.queue))

    def _reject(self, forward: Forward, reason: str, message: str) -> Finish:
        task = forward.task
        record = task_error_record(task, reason, message)
        return Finish(task.id, record, self.keys.tasks, forward.entry_id, task.reply_to)


def generation_limits(spec: ModelSpec) -> GenerationLimits:
    """What a seq2seq model's tasks may ask of generation: its entry's options, below its decoder's
    positions, as the worker fits them once the model is loaded (`seq2seq.fit_limits`)."""
    try:
        return GenerationLimits.from_options(spec.options).within_positions(spec.decoder_positions or None)
    except ValueError as exc:
        raise RegistryError(f"model {spec.name!r}: {exc}") from None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _predicted(task: Task) -> bool:
    """Whether admission predicts this task's latency (see `Dispatcher._admit_one`)."""
    return task.task_class == "realtime" and task.deadline_ms is not None


def _forwarding(forward: Forward) -> Forwarding:
    task = forward.task
    return Forwarding(forward.queue, task.model, task.id, forward.entry_id, task.to_fields())
