"""Task validation: every field, every way it can be wrong, gives a TaskError naming it — never
another exception."""

from __future__ import annotations

import pytest

from ectrans.common.schemas import (
    MAX_DEADLINE_MS,
    Limits,
    Reason,
    Task,
    TaskError,
    parse_task,
    reply_to_of,
    task_id_of,
)

ENTRY = "1700000000000-0"
LIMITS = Limits(max_input_chars=100, max_task_bytes=1024)


def raw(**fields: str | bytes) -> dict[bytes, bytes]:
    base: dict[str, str | bytes] = {"model": "m", "op": "embed", "input": "hello"}
    base.update(fields)
    return {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in base.items()}


def rejected(fields: dict[bytes, bytes], limits: Limits = LIMITS) -> TaskError:
    with pytest.raises(TaskError) as caught:
        parse_task(ENTRY, fields, limits)
    assert caught.value.reason == Reason.BAD_INPUT
    return caught.value


def test_a_minimal_task_takes_its_defaults_and_the_entry_time() -> None:
    task = parse_task(ENTRY, raw(), LIMITS)
    assert (task.id, task.model, task.op, task.input) == (ENTRY, "m", "embed", "hello")
    assert task.submitted_ms == 1700000000000 and task.deadline_ms is None
    assert (task.encoding, task.on_miss, task.priority, task.params) == ("json", "error", None, {})


def test_every_field_parsed() -> None:
    fields = raw(
        op="translate", id="job-1", priority="realtime", deadline_ms="250", reply_to="c.1", encoding="msgpack",
        on_miss="batch", num_beams="4", max_new_tokens="64",
    )  # fmt: skip
    task = parse_task(ENTRY, fields, LIMITS)
    assert (task.id, task.priority, task.deadline_ms, task.reply_to) == ("job-1", "realtime", 250, "c.1")
    assert (task.encoding, task.on_miss, task.params) == ("msgpack", "batch", {"num_beams": 4, "max_new_tokens": 64})
    assert task.deadline_at_ms == 1700000000250


@pytest.mark.parametrize("missing", ["model", "op", "input"])
def test_missing_required_fields(missing: str) -> None:
    fields = raw()
    del fields[missing.encode()]
    assert f"missing field '{missing}'" in rejected(fields).message


@pytest.mark.parametrize("name", ["model", "op", "input", "id", "priority", "deadline_ms", "reply_to", "encoding"])
def test_invalid_utf8_in_any_field(name: str) -> None:
    assert f"field '{name}' is not valid UTF-8" in rejected(raw(**{name: b"ok\xff\xfe"})).message


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("", "1-128"),
        ("x" * 129, "1-128"),
        ("has space", "1-128"),
        ("job\n", "1-128"),  # `$` in a regex would have let the newline through
        ("ключ", "1-128"),
        ("a/b", "1-128"),
    ],
)
def test_bad_ids(value: str, why: str) -> None:
    assert why in rejected(raw(id=value)).message
    assert task_id_of(ENTRY, raw(id=value)) == ENTRY, "the error result is keyed by the entry id instead"


def test_good_ids_key_the_result() -> None:
    for value in ("a", "x" * 128, "job-1.2:3_4"):
        assert parse_task(ENTRY, raw(id=value), LIMITS).id == value
        assert task_id_of(ENTRY, raw(id=value)) == value


def test_reply_to_follows_the_id_rules() -> None:
    assert "reply_to" in rejected(raw(reply_to="two words")).message
    assert reply_to_of(raw(reply_to="two words")) is None
    assert reply_to_of(raw(reply_to=b"bad\xff")) is None
    assert reply_to_of(raw(reply_to="client-7")) == "client-7"


@pytest.mark.parametrize(
    "value",
    ["0", "-1", "-250", str(MAX_DEADLINE_MS + 1), "99999999999999999999", "soon", "", " ", "1.5", "1e3", "0x10",
     "1_000", "١٢٣", "+", "9" * 5000, "NaN", "inf"],
)  # fmt: skip
def test_bad_deadlines(value: str) -> None:
    assert "deadline_ms" in rejected(raw(deadline_ms=value), Limits(max_task_bytes=64 * 1024)).message


@pytest.mark.parametrize(("value", "expected"), [("1", 1), (" 250 ", 250), ("+7", 7), (str(MAX_DEADLINE_MS), None)])
def test_good_deadlines(value: str, expected: int | None) -> None:
    assert parse_task(ENTRY, raw(deadline_ms=value), LIMITS).deadline_ms == (expected or MAX_DEADLINE_MS)


@pytest.mark.parametrize(
    ("name", "value"),
    [("num_beams", "0"), ("num_beams", "9"), ("num_beams", "two"), ("max_new_tokens", "513"), ("max_new_tokens", "-1")],
)
def test_op_params_out_of_range(name: str, value: str) -> None:
    assert name in rejected(raw(op="translate", **{name: value})).message


@pytest.mark.parametrize("op", ["embed", "noop"])
@pytest.mark.parametrize(("name", "value"), [("num_beams", "4"), ("max_new_tokens", "16"), ("num_beams", "99")])
def test_generation_settings_on_an_op_that_takes_none_are_refused_naming_both(op: str, name: str, value: str) -> None:
    """Ignored, they would also have kept such tasks out of each other's batches."""
    message = rejected(raw(op=op, **{name: value})).message
    assert f"'{name}'" in message and f"op '{op}' does not take" in message and "translate" in message


def test_generation_settings_of_an_unknown_op_are_left_to_the_dispatcher() -> None:
    """An op no model serves is answered `unknown_op`, whatever it carries."""
    assert parse_task(ENTRY, raw(op="summarise", num_beams="2"), LIMITS).params == {"num_beams": 2}


@pytest.mark.parametrize(
    ("name", "value"), [("priority", "urgent"), ("encoding", "pickle"), ("on_miss", "retry"), ("priority", "")]
)
def test_choices(name: str, value: str) -> None:
    assert f"field '{name}' must be one of" in rejected(raw(**{name: value})).message


def test_sizes() -> None:
    assert "empty" in rejected(raw(input=" \t\n ")).message
    assert "101 characters" in rejected(raw(input="a" * 101)).message
    assert parse_task(ENTRY, raw(input="é" * 100), LIMITS).input == "é" * 100  # characters, not bytes
    error = rejected(raw(input="a" * 50, padding="b" * 1000))
    assert "over the limit of 1024" in error.message  # all fields count, known or not


def test_unknown_fields_are_ignored_or_rejected_by_policy() -> None:
    fields = raw(colour="blue", **{"\u00e9t\u00e9": "x"})
    fields[b"\xff\xfe"] = b"binary name"
    assert parse_task(ENTRY, fields, LIMITS).input == "hello"
    error = rejected(fields, Limits(max_input_chars=100, max_task_bytes=1024, reject_unknown_fields=True))
    assert "unknown fields" in error.message and "colour" in error.message


def test_forwarded_entries_that_are_malformed_are_internal_errors() -> None:
    task = Task(id="t", model="m", op="embed", input="x", submitted_ms=5, deadline_ms=10, reply_to="c")
    wire = {k.encode(): v.encode() if isinstance(v, str) else v for k, v in task.to_fields().items()}
    assert Task.from_fields(wire) == task
    for broken in (
        {k: v for k, v in wire.items() if k != b"input"},
        {**wire, b"submitted_ms": b"yesterday"},
        {**wire, b"input": b"\xff"},
        {**wire, b"\xff": b"x"},
    ):
        with pytest.raises(TaskError) as caught:
            Task.from_fields(broken)
        assert caught.value.reason == Reason.INTERNAL
