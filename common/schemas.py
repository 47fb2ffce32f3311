"""Tasks and terminal records as they travel through Redis.

A task arrives as plain stream fields (redis-cli friendly). `parse_task` validates every field and
turns problems into a `TaskError` whose message names the field — never an exception that could
crash a service. Forwarded and result records are flat string fields too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ectrans.common.registry import ENCODER_OPS, NOOP_OPS, SEQ2SEQ_OPS

# `\Z`, not `$`: `$` also matches before a trailing newline, which would let "job\n" through.
TASK_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}\Z")
# Stream entry IDs (`<ms>-<seq>`) key the results of tasks without an `id`: a client id of that
# shape could claim the record of a task XADDed later, so client ids must never look like one.
ENTRY_ID_RE = re.compile(r"^[0-9]+-[0-9]+\Z")
ID_RULE = "1-128 of letters, digits, '.', '_', ':', '-', not shaped like a stream entry ID (<ms>-<seq>)"
# Plain ASCII decimal integers only: `int()` alone also takes "1_000", "١٢٣" and 4000-digit strings.
INT_RE = re.compile(r"^[+-]?[0-9]{1,18}\Z")
PRIORITIES = ("realtime", "batch")
ENCODINGS = ("json", "msgpack")
ON_MISS = ("error", "batch")
MAX_DEADLINE_MS = 24 * 3600 * 1000
TRUNCATE = ("1", "0", "true", "false")
# Op parameters a task may carry as fields, with their allowed ranges (the ceiling: a model's own
# limits, checked by the dispatcher, may be lower).
OP_PARAMS: dict[str, tuple[int, int]] = {"num_beams": (1, 8), "max_new_tokens": (1, 512)}
# Ops that take none: a parameter there would be ignored without a word (and would keep its task
# out of other tasks' batches), so it is refused, as OpenAI and TEI refuse a parameter an endpoint
# does not take. Ops no model serves are left to the dispatcher's `unknown_op`.
OPS_WITHOUT_PARAMS = ENCODER_OPS | NOOP_OPS
SPLIT_FIELDS = ("segment", "revision")  # a split task: `input` holds the activation payload (see `split`)
MAX_SEGMENT = 1024
KNOWN_FIELDS = frozenset(
    {"model", "op", "input", "priority", "deadline_ms", "id", "reply_to", "encoding", "on_miss", "truncate", *OP_PARAMS}
    | set(SPLIT_FIELDS)
)


class Reason:
    """Machine-readable error reasons carried in a result's `reason` field."""

    BAD_INPUT = "bad_input"
    UNKNOWN_MODEL = "unknown_model"
    UNKNOWN_OP = "unknown_op"
    DEADLINE = "deadline"
    OVERLOADED = "overloaded"
    DEAD_LETTER = "dead_letter"
    UNAVAILABLE = "unavailable"  # no live worker serves the model (past a grace period)
    VERSION_MISMATCH = "version_mismatch"  # a split task computed with another model revision or contract
    DUPLICATE_ID = "duplicate_id"  # the task's `id` belongs to another task: answered under its entry ID
    INTERNAL = "internal"
    CANCELLED = "cancelled"  # its client cancelled it before a worker started it


class TaskError(Exception):
    """A task that gets an error result instead of being run."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Limits:
    max_input_chars: int = 10_000
    max_task_bytes: int = 64 * 1024
    reject_unknown_fields: bool = False
    max_split_bytes: int = 8 * 1024 * 1024  # a split task's activations: 1.5 MB of float32 for 512 x 768


@dataclass(frozen=True)
class Task:
    """A validated task. `submitted_ms` comes from the ingress stream entry ID (Redis's clock)."""

    id: str
    model: str
    op: str
    input: str
    submitted_ms: int
    priority: str | None = None
    deadline_ms: int | None = None
    reply_to: str | None = None
    encoding: str = "json"
    on_miss: str = "error"
    params: dict[str, int] = field(default_factory=dict)
    task_class: str = "batch"
    downgraded: bool = False
    # A split task: the client ran units[0:segment] of model `revision`; `payload` holds their output.
    segment: int = 0
    revision: str = ""
    payload: bytes = b""
    truncate: bool = False  # cut an input over the model's token limit instead of refusing it

    @property
    def is_split(self) -> bool:
        return self.segment > 0

    @property
    def deadline_at_ms(self) -> int | None:
        return None if self.deadline_ms is None else self.submitted_ms + self.deadline_ms

    def classified(self, task_class: str, *, downgraded: bool = False) -> Task:
        # `dataclasses.replace` re-runs the frozen __init__ over every field (about 15 us a task in
        # the dispatcher's profile); a copy of the instance dict is the same shallow copy, faster.
        task = object.__new__(Task)
        task.__dict__.update(self.__dict__, task_class=task_class, downgraded=downgraded)
        return task

    def to_fields(self) -> dict[str, str | bytes]:
        """Fields of the forwarded entry in a model queue."""
        fields: dict[str, str | bytes] = {
            "id": self.id,
            "model": self.model,
            "op": self.op,
            "input": self.payload if self.is_split else self.input,
            "submitted_ms": str(self.submitted_ms),
            "class": self.task_class,
            "encoding": self.encoding,
        }
        if self.deadline_ms is not None:
            fields["deadline_ms"] = str(self.deadline_ms)
        if self.reply_to:
            fields["reply_to"] = self.reply_to
        if self.downgraded:
            fields["downgraded"] = "1"
        if self.is_split:
            fields.update(segment=str(self.segment), revision=self.revision)
        if self.truncate:
            fields["truncate"] = "1"
        fields.update({k: str(v) for k, v in self.params.items()})
        return fields

    @classmethod
    def from_fields(cls, raw: dict[bytes, bytes]) -> Task:
        """Read a forwarded entry (written by the dispatcher, so only re-checked for shape)."""
        try:
            split = b"segment" in raw
            payload = raw[b"input"] if split else b""  # binary: never decoded as text
            f = {k.decode(): v.decode() for k, v in raw.items() if not (split and k == b"input")}
            return cls(
                id=f["id"],
                model=f["model"],
                op=f["op"],
                input="" if split else f["input"],
                submitted_ms=int(f["submitted_ms"]),
                deadline_ms=int(f["deadline_ms"]) if "deadline_ms" in f else None,
                reply_to=f.get("reply_to"),
                encoding=f.get("encoding", "json"),
                params={k: int(f[k]) for k in OP_PARAMS if k in f},
                task_class=f.get("class", "batch"),
                downgraded=f.get("downgraded") == "1",
                segment=int(f.get("segment", 0)),
                revision=f.get("revision", ""),
                payload=payload,
                truncate=f.get("truncate") == "1",
            )
        except (KeyError, ValueError) as exc:
            raise TaskError(Reason.INTERNAL, f"malformed queue entry: {exc!r}") from exc


def entry_ms(entry_id: str) -> int:
    """Milliseconds timestamp of a stream entry ID (`1700000000000-0`)."""
    return int(entry_id.split("-", 1)[0])


def _text(raw: dict[bytes, bytes], name: str) -> str | None:
    value = raw.get(name.encode())
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = f"byte {exc.start}: a lone surrogate or a broken sequence"
        raise TaskError(Reason.BAD_INPUT, f"field '{name}' is not valid UTF-8 ({where})") from None


def _choice(raw: dict[bytes, bytes], name: str, allowed: tuple[str, ...]) -> str | None:
    value = _text(raw, name)
    if value is not None and value not in allowed:
        raise TaskError(Reason.BAD_INPUT, f"field '{name}' must be one of {', '.join(allowed)}, got {value!r:.40}")
    return value


def _int(raw: dict[bytes, bytes], name: str, low: int, high: int) -> int | None:
    value = _text(raw, name)
    if value is None:
        return None
    text = value.strip()
    if not INT_RE.match(text):
        raise TaskError(Reason.BAD_INPUT, f"field '{name}' must be an integer, got {value!r:.40}")
    number = int(text)
    if not low <= number <= high:
        raise TaskError(Reason.BAD_INPUT, f"field '{name}' must be between {low} and {high}, got {number}")
    return number


def is_client_id(task_id: str) -> bool:
    """Whether `task_id` is a valid client-chosen id (an id that must be claimed before use)."""
    return TASK_ID_RE.match(task_id) is not None and ENTRY_ID_RE.match(task_id) is None


def task_id_of(entry_id: str, raw: dict[bytes, bytes]) -> str:
    """The id a task's result is keyed by: its valid `id` field, else the stream entry ID."""
    value = raw.get(b"id")
    if value is not None:
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            return entry_id
        if is_client_id(text):
            return text
    return entry_id


def reply_to_of(raw: dict[bytes, bytes]) -> str | None:
    value = raw.get(b"reply_to")
    if value is None:
        return None
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if TASK_ID_RE.match(text) else None


def parse_task(entry_id: str, raw: dict[bytes, bytes], limits: Limits) -> Task:
    """Validate an ingress entry; raise TaskError naming the first problem found."""
    split = b"segment" in raw
    total = sum(len(k) + len(v) for k, v in raw.items())
    limit = limits.max_split_bytes if split else limits.max_task_bytes
    if total > limit:
        raise TaskError(Reason.BAD_INPUT, f"task is {total} bytes, over the limit of {limit}")
    if limits.reject_unknown_fields:
        names = (k.decode("utf-8", "replace") for k in raw)
        unknown = sorted(name for name in names if name not in KNOWN_FIELDS)
        if unknown:
            raise TaskError(Reason.BAD_INPUT, f"unknown fields: {', '.join(unknown)[:200]}")
    raw_id = _text(raw, "id")
    if raw_id is not None and not is_client_id(raw_id):
        raise TaskError(Reason.BAD_INPUT, f"field 'id' must be {ID_RULE}")
    model, op = _text(raw, "model"), _text(raw, "op")
    text = "" if split else _text(raw, "input")
    for name, value in (("model", model), ("op", op), ("input", raw.get(b"input") if split else text)):
        if value is None:
            raise TaskError(Reason.BAD_INPUT, f"missing field '{name}'")
    assert model is not None and op is not None and text is not None
    if not split and not text.strip():
        raise TaskError(Reason.BAD_INPUT, "field 'input' is empty")
    if len(text) > limits.max_input_chars:
        raise TaskError(
            Reason.BAD_INPUT,
            f"field 'input' has {len(text)} characters, over the limit of {limits.max_input_chars}",
        )
    reply_to = _text(raw, "reply_to")
    if reply_to is not None and not TASK_ID_RE.match(reply_to):
        raise TaskError(Reason.BAD_INPUT, "field 'reply_to' must be 1-128 of letters, digits, '.', '_', ':', '-'")
    params = _op_params(raw, op)
    return Task(
        id=raw_id or entry_id,
        model=model,
        op=op,
        input=text,
        submitted_ms=entry_ms(entry_id),
        priority=_choice(raw, "priority", PRIORITIES),
        deadline_ms=_int(raw, "deadline_ms", 1, MAX_DEADLINE_MS),
        reply_to=reply_to,
        encoding=_choice(raw, "encoding", ENCODINGS) or "json",
        on_miss=_choice(raw, "on_miss", ON_MISS) or "error",
        params=params,
        truncate=_choice(raw, "truncate", TRUNCATE) in ("1", "true"),
        **(_split_fields(raw) if split else {}),
    )


def _op_params(raw: dict[bytes, bytes], op: str) -> dict[str, int]:
    if op in OPS_WITHOUT_PARAMS:
        if given := [name for name in OP_PARAMS if name.encode() in raw]:
            takers = " and ".join(sorted(SEQ2SEQ_OPS))
            message = f"field {given[0]!r} is a generation setting, which op {op!r} does not take (only {takers} do)"
            raise TaskError(Reason.BAD_INPUT, message)
        return {}
    return {name: v for name, (lo, hi) in OP_PARAMS.items() if (v := _int(raw, name, lo, hi)) is not None}


def _split_fields(raw: dict[bytes, bytes]) -> dict[str, Any]:
    payload = raw.get(b"input", b"")
    if not payload:
        raise TaskError(Reason.BAD_INPUT, "field 'input' is empty")
    revision = _text(raw, "revision")
    if not revision:
        raise TaskError(Reason.BAD_INPUT, "a split task (with 'segment') needs the 'revision' of its model")
    return {"segment": _int(raw, "segment", 1, MAX_SEGMENT), "revision": revision, "payload": payload}


def as_str_dict(raw: dict[bytes, bytes]) -> dict[str, Any]:
    """Best-effort readable copy of raw fields (for dead letters and logs)."""
    return {k.decode("utf-8", "replace"): v.decode("utf-8", "replace")[:200] for k, v in raw.items()}
