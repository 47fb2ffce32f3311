"""Every error leaves the gateway through here: a task's `reason` (or a gateway check) becomes one
HTTP status and one body, in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`) or,
on TEI's `/embed` (and `POST /`, where TEI clients given only the server's address send), in TEI's
(`{"error", "error_type"}`)."""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from starlette.responses import Response

from ectrans.client import TaskResult
from ectrans.common.schemas import Reason

# TEI's paths: TEI answers `POST /` as `/embed` for an embedding model, and `huggingface_hub`'s
# `InferenceClient(base_url=...)` posts there.
TEI_PATHS = frozenset({"/embed", "/"})
# nginx's "client closed request": only logs and metrics see it, the client is gone.
CLIENT_CLOSED = 499

REASON_STATUS = {
    Reason.BAD_INPUT: 400,
    Reason.UNKNOWN_OP: 400,
    Reason.VERSION_MISMATCH: 400,
    Reason.UNKNOWN_MODEL: 404,
    Reason.DUPLICATE_ID: 409,  # the gateway's own ids are unique; kept for a record read back by id
    Reason.OVERLOADED: 429,
    Reason.DEAD_LETTER: 500,
    Reason.INTERNAL: 500,
    Reason.UNAVAILABLE: 503,
    Reason.DEADLINE: 504,
    Reason.CANCELLED: CLIENT_CLOSED,
}
# Seconds a client should wait before trying again: a full queue drains fast, a missing worker slowly.
RETRY_AFTER_S = {Reason.OVERLOADED: 1, Reason.UNAVAILABLE: 5}
# The OpenAI SDKs retry every 5xx twice by default unless told otherwise by this header. A 500 is an
# input that fails the model (`internal` after the batch is split down to it, `dead_letter` after it
# took workers down) or a command Redis refuses: sent again, it fails again, or takes more workers down.
NO_RETRY = {"x-should-retry": "false"}


@dataclass
class GatewayError(Exception):
    """A request answered with an error; `code` is the ECTrans reason or the gateway's own code."""

    status: int
    message: str
    code: str
    param: str | None = None
    retry_after_s: int | None = None
    headers: dict[str, str] | None = None
    tei_type: str | None = None  # TEI's own error_type where it differs from the status's (`Empty`: 400)

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    @classmethod
    def for_reason(cls, reason: str, message: str, param: str | None = None) -> GatewayError:
        """The error for an ECTrans reason: its status and, where one applies, its Retry-After."""
        return cls(REASON_STATUS.get(reason, 500), message, reason, param, RETRY_AFTER_S.get(reason))

    @classmethod
    def from_result(cls, result: TaskResult, index: int, count: int) -> GatewayError:
        reason = result.reason or Reason.INTERNAL
        which = f"input {index}: " if count > 1 else ""
        param = "input" if reason == Reason.BAD_INPUT else None
        return cls.for_reason(reason, f"{which}{result.error or reason}", param)


def bad_request(message: str, param: str | None = None, code: str = Reason.BAD_INPUT) -> GatewayError:
    return GatewayError(400, message, code, param)


def unknown_model(model: str, why: str = "") -> GatewayError:
    """A 404 for a model outside the registry (its name cut: a client chooses how long it is)."""
    return GatewayError(404, f"unknown model {model[:100]!r}{'; ' + why if why else ''}", Reason.UNKNOWN_MODEL, "model")


def too_many_inputs(count: int, limit: int, param: str) -> GatewayError:
    """A request's texts or token-id lists over `gateway_max_inputs`."""
    return bad_request(f"'{param}' has {count} items, over the limit of {limit}", param)


def too_long_input(index: int, tokens: int, model: str, limit: int, *, status: int, param: str) -> GatewayError:
    """Input `index` (text or token ids) over the model's token limit, where it is not cut."""
    message = f"input {index} has {tokens} tokens, over the limit of {limit} of model {model!r}"
    return GatewayError(status, message + "; shorten it or set truncate=true", Reason.BAD_INPUT, param)


def _openai_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if status < 500 else "server_error"


def _tei_type(status: int) -> str:
    if status == 429:
        return "Overloaded"
    if status == 503:
        return "Unhealthy"
    if status == 401:
        return "Unauthorized"
    return "Validation" if status < 500 else "Backend"


def render(error: GatewayError, *, tei: bool = False) -> Response:
    status = error.status
    body: dict[str, object]
    if tei and error.tei_type is not None:
        body = {"error": error.message, "error_type": error.tei_type}
    elif tei:
        status = 422 if status == 400 else status  # TEI answers a request it cannot validate with 422
        body = {"error": error.message, "error_type": _tei_type(status)}
    else:
        detail = {"message": error.message, "type": _openai_type(status), "param": error.param, "code": error.code}
        body = {"error": detail}
    headers = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s is not None else None
    if error.headers:
        headers = {**(headers or {}), **error.headers}
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    if status == 500:
        headers = {**(headers or {}), **NO_RETRY}
    return Response(orjson.dumps(body), status, headers, media_type="application/json")
