"""The gateway's FastAPI app: parse and check a request, submit its inputs as tasks through the
shared `AsyncClient`, map the results (or the reason of the first error) to the response.

No model code and no Redis key is spelled out here: tasks go through the client library, liveness
through `common.presence`, token counts through `tokens.py`, errors through `errors.py`. Over 400
lines only because each endpoint's OpenAPI description lives beside its handler, where FastAPI users
look for it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp

from ectrans import __version__
from ectrans.client import AsyncClient, TaskFailed, TaskResult
from ectrans.common.heartbeat import Heartbeat
from ectrans.common.presence import live
from ectrans.common.redis_conn import RedisClient, connect
from ectrans.common.registry import MODEL_NAME_RULE, ModelSpec, is_model_name
from ectrans.common.schemas import MAX_DEADLINE_MS, Reason
from ectrans.models.pooling_config import declared_pooling
from ectrans.services.gateway.errors import (
    CLIENT_CLOSED,
    TEI_PATHS,
    GatewayError,
    bad_request,
    render,
    too_long_input,
    too_many_inputs,
    unknown_model,
)
from ectrans.services.gateway.metrics import GatewayMetrics
from ectrans.services.gateway.middleware import Endpoint, Guard, Shortcut
from ectrans.services.gateway.prompts import prompt_text
from ectrans.services.gateway.protocol import (
    EmbeddingModelInfo,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbedRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    TEIError,
    TEIInfo,
    TEIModelType,
    TranslateRequest,
    TranslateResponse,
)
from ectrans.services.gateway.settings import GatewaySettings
from ectrans.services.gateway.store import StoreHealth
from ectrans.services.gateway.token_ids import TokenIdTasks, token_id_rows, token_id_tasks
from ectrans.services.gateway.tokens import TokenCounter

logger = logging.getLogger(__name__)
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

FAREWELL_S = 1.0  # longest a stop waits for Redis to record it (the heartbeat expires otherwise)
PRIORITY_HEADER = "x-ectrans-priority"
DEADLINE_HEADER = "x-ectrans-deadline-ms"
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "bad input (`bad_input`, `unknown_op`)",
        401: "missing or wrong API key",
        404: "unknown model",
        409: "the task's id belongs to another task (`duplicate_id`; not produced by the gateway's own ids)",
        413: "request body too large",
        429: "overloaded (with Retry-After)",
        500: "internal error",
        503: "no live worker serves the model, or Redis is unreachable (with Retry-After)",
        504: "deadline passed, or no answer within the gateway's timeout",
        499: "the client closed the request; its tasks were cancelled (seen in logs and metrics only)",
    }.items()
}


def json_response(body: object, status: int = 200) -> Response:
    """`body` as JSON, numpy arrays as lists, by orjson: a fifth of the json module's CPU for a
    one-number vector, a fortieth for a 384-number one (no Python floats made in between)."""
    content = orjson.dumps(body, default=_strided, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(content, status, media_type="application/json")


def _strided(value: object) -> object:
    """What orjson hands back: only an array that is not C-contiguous (a strided view) is expected."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class Gateway:
    """What every request of one gateway process shares: one client (one reply stream), one Redis
    connection for liveness questions, the token counters and the metrics."""

    def __init__(
        self, settings: GatewaySettings, registry: dict[str, ModelSpec], metrics: GatewayMetrics, instance: str
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.keys = settings.keys
        self.client = AsyncClient(settings.redis_url, prefix=settings.prefix)
        self.redis: RedisClient = connect(settings.redis_url, client_name=f"ectrans-gateway-{instance}")
        self.tokens = TokenCounter(registry)
        self.store = StoreHealth()
        self.heartbeat = Heartbeat(
            self.redis, self.keys, "gateway", instance, interval_s=settings.heartbeat_s, extra=self._beat_fields
        )
        self._stopping = asyncio.Event()
        self._beating: asyncio.Task[None] | None = None
        self._connecting: asyncio.Task[None] | None = None
        self.waiting_inputs = 0  # inputs submitted and not yet answered, for the heartbeat
        self.requests_held = 0  # task requests being served (gateway_max_concurrent_requests)

    def _beat_fields(self) -> dict[str, object]:
        return {"waiting_inputs": self.waiting_inputs}

    async def start(self) -> None:
        """Serve whether or not Redis answers yet: the client connects in the background (on its first
        task if that fails), so `/health` answers at once; `/ready` and task requests answer 503 until
        Redis does, instead of a start-up failure and a restart loop while Redis itself starts."""
        self._connecting = asyncio.create_task(self._connect())
        self._beating = asyncio.create_task(self.heartbeat.run(self._stopping))

    async def _connect(self) -> None:
        try:
            await self.client.connect()
        except RedisError as exc:
            self.store.failed(exc)

    async def stop(self) -> None:
        """Say goodbye to Redis where it answers, in at most about a second where it does not (stopped
        with the gateway): each farewell write waited out the connection's retries, ~10 s in all."""
        self._stopping.set()
        if self._connecting is not None:
            self._connecting.cancel()
            await asyncio.gather(self._connecting, return_exceptions=True)
        await asyncio.gather(self._heartbeat_farewell(), self.client.close())
        await self.redis.aclose()

    async def _heartbeat_farewell(self) -> None:
        """The stop event and the heartbeat key's removal; past `FAREWELL_S` the key expires instead."""
        if self._beating is None:
            return
        try:
            await asyncio.wait_for(self._beating, FAREWELL_S)
        except TimeoutError:
            logger.warning(
                "[stop] Redis did not answer within %gs: the gateway's heartbeat expires instead", FAREWELL_S
            )

    # Requests -------------------------------------------------------------------------------------

    def embed_op(self, model: str) -> str:
        """A no-op model answers the embedding endpoints with its own op: the HTTP path can then be
        measured without a model (its vector is one number, the input's length in characters)."""
        spec = self.registry.get(model)
        return "noop" if spec is not None and spec.kind == "noop" else "embed"

    async def check_lengths(
        self, model: str, texts: Sequence[str], *, truncate: bool, status: int, entry_may_cut: bool = True
    ) -> int:
        """Total tokens of `texts`; an input over the model's limit is refused unless `truncate`, or
        the model entry's `truncate` where the request leaves it to the entry (`entry_may_cut`)."""
        counts = await self.tokens.count(model, texts)
        if counts is None:  # a model the dispatcher may know and this gateway does not: it decides
            return 0
        spec = self.registry[model]
        if not (truncate or (spec.truncate and entry_may_cut)) and spec.kind != "noop":
            for index, count in enumerate(counts):
                if count > spec.max_tokens:
                    raise too_long_input(index, count, model, spec.max_tokens, status=status, param="input")
        return sum(counts)

    def holding(self, handler: Endpoint) -> Endpoint:
        """`handler` with its request counted against `gateway_max_concurrent_requests` from its first
        step: a request over the bound is answered 429 before its body is read, parsed or counted."""

        @functools.wraps(handler)
        async def held(request: Request) -> Response:
            limit = self.settings.gateway_max_concurrent_requests
            if self.requests_held >= limit:
                raise GatewayError.for_reason(
                    Reason.OVERLOADED,
                    f"the gateway holds {limit} requests, its limit (ECTRANS_GATEWAY_MAX_CONCURRENT_REQUESTS);"
                    " retry later",
                )
            self.requests_held += 1
            try:
                return await handler(request)
            finally:
                self.requests_held -= 1

        return held

    async def run(
        self,
        request: Request,
        model: str,
        op: str,
        texts: Sequence[str | bytes],
        *,
        options: tuple[str | None, int | None],
        params: dict[str, int] | None = None,
        truncate: bool = False,
        split: TokenIdTasks | None = None,
    ) -> list[TaskResult]:
        """Submit one task per text (or split payload, with `split`) and wait for all; the first error
        result to arrive becomes a GatewayError at once (a queue that sheds one input answers 429 now, not
        after the rest are computed for nothing). A client that disconnects first gets its tasks cancelled (those
        not started are not computed)."""
        priority, deadline_ms = options
        if not is_model_name(model):
            # No registry can hold it, so it is unknown: answered here, as the dispatcher would, rather
            # than a long one sent on to be refused as a task too large, under the param of the input.
            raise unknown_model(model, f"a model name is {MODEL_NAME_RULE}")
        if (refusal := self.store.refusal()) is not None:
            raise refusal
        self.metrics.submitted(model, len(texts))
        submitting = self.client.submit_many(
            model,
            op,
            texts,
            priority=priority,
            deadline_ms=deadline_ms,
            params=params,
            timeout=None,  # bounded by `within` below
            fail_fast=True,  # the request fails as a whole: its other tasks are cancelled, not waited for
            truncate=truncate,
            **({"segment": split.segment, "revision": split.revision} if split is not None else {}),
        )
        self.waiting_inputs += len(texts)
        try:
            results = await until_disconnect(request, within(submitting, self.settings.gateway_timeout_s))
        except TaskFailed as failure:
            self.store.answered()
            raise GatewayError.from_result(failure.result, failure.index or 0, len(texts)) from None
        except ClientGone:
            self.metrics.cancelled.inc(len(texts))
            closed = "the client closed the request; its tasks were cancelled"
            raise GatewayError(CLIENT_CLOSED, closed, Reason.CANCELLED) from None
        except TimeoutError:
            waited = self.settings.gateway_timeout_s
            unanswered = f"no answer within {waited:g}s; the request's unanswered tasks were cancelled"
            raise GatewayError(504, unanswered, "timeout") from None
        except RedisError as exc:
            raise self.store.failed(exc) from None
        finally:
            self.waiting_inputs -= len(texts)
        self.store.answered()
        return results

    async def embed(
        self,
        request: Request,
        model: str,
        inputs: object,
        options: tuple[str | None, int | None],
        *,
        param: str,
        truncate: bool,
        too_long_status: int,
        entry_may_cut: bool = True,
        prompt: str | None = None,
    ) -> tuple[list[TaskResult], int]:
        """Embed `inputs` (texts or token ids, as parsed) with `model`: the results, and their tokens.
        A `prompt` (TEI's `prompt_name`) goes before each text."""
        rows = token_id_rows(inputs)
        limit = self.settings.gateway_max_inputs
        if rows is not None and prompt is not None:
            raise bad_request("prompt_name applies to text; token ids are sent as they are", "prompt_name")
        if rows is not None:
            spec = self.registry.get(model)
            cut = truncate or (spec is not None and spec.truncate and entry_may_cut)
            split = token_id_tasks(
                rows, spec, model, limit=limit, param=param, cut=cut, too_long_status=too_long_status
            )
            results = await self.run(request, model, "embed", split.payloads, options=options, split=split)
            return results, split.tokens
        texts = text_inputs(inputs, limit, param)
        if prompt is not None:  # after the checks of the texts themselves: a prompt does not fill an empty one
            texts = [prompt + text for text in texts]
        tokens = await self.check_lengths(
            model, texts, truncate=truncate, status=too_long_status, entry_may_cut=entry_may_cut
        )
        results = await self.run(request, model, self.embed_op(model), texts, options=options, truncate=truncate)
        return results, tokens

    async def served_models(self) -> set[str]:
        """Models some live worker serves now; a GatewayError or a RedisError where Redis fails (see
        `store.py`)."""
        if (refusal := self.store.refusal()) is not None:
            raise refusal
        workers = await live(self.redis, self.keys, "worker")
        self.store.answered()
        return {model for worker in workers for model in worker.models}


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first. The body has been read by now,
    so the next message from the server is `http.disconnect`: sent when the client goes away (or
    after the response, when nobody waits any more)."""
    handler = asyncio.current_task()
    assert handler is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        handler.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        handler.uncancel()
        raise ClientGone from None
    finally:
        watcher.cancel()


async def within(work: Awaitable[T], timeout_s: float) -> T:
    """`work`, cancelled after `timeout_s` (TimeoutError). A cancelled `submit_many` cancels its
    unanswered tasks, as for a client that disconnects: a request answered 504 leaves no task queued,
    which the OpenAI SDKs, retrying a 504 twice by default, would otherwise add to each time."""
    async with asyncio.timeout(timeout_s):
        return await work


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI description of a body the handler parses itself (see `parse_body`)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


async def parse_body(request: Request, model: type[M], timeout_s: float) -> M:
    """The JSON body as `model`, in one pass of pydantic's own JSON parser: several times less CPU per
    request than FastAPI's parameter machinery (a JSON decode, then validation of the Python objects)."""
    body = await read_body(request, timeout_s)
    try:
        parsed = model.model_validate_json(body)
    except ValidationError as exc:
        raise invalid_request(exc.errors(), takes_ids=model in (EmbeddingRequest, EmbedRequest)) from None
    # pydantic keeps the last of two equal keys; the request is ambiguous (TEI refuses it too). A valid
    # body's one object is the top level, so this second parse calls the hook once.
    json.loads(body, object_pairs_hook=_unique_keys)
    return parsed


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) < len(keys):
        twice = next(key for index, key in enumerate(keys) if key in keys[:index])
        raise bad_request(f"the field {twice[:40]!r} appears twice in the body", twice[:40])
    return dict(pairs)


async def read_body(request: Request, timeout_s: float | None = None) -> bytes:
    """The body, from the ASGI messages themselves: a third of the CPU of `Request.body`, which
    streams them through an async generator. A body still incomplete after `timeout_s` is refused
    (408): a client that sends part of one and waits would hold its place under the request bound."""
    chunks = []
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    closed = "the client closed the request before its body arrived"
                    raise GatewayError(CLIENT_CLOSED, closed, Reason.CANCELLED)
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    return b"".join(chunks)
    except TimeoutError:
        late = f"the request body did not arrive within {timeout_s:g}s"
        # `close` (RFC 9110, 408): the connection would otherwise wait out keep-alive for the body's rest.
        raise GatewayError(408, late, "body_timeout", headers={"connection": "close"}) from None


def invalid_request(errors: Sequence[Any], *, takes_ids: bool = False) -> GatewayError:
    """A 400 naming the first problem pydantic found (`input: Input should be a valid string`);
    `takes_ids`: the body's input may be token ids (the embedding endpoints)."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    if where and where[0] in ("input", "inputs") and first.get("type") not in ("missing", "extra_forbidden"):
        # Every branch of the union failed: pydantic's first complaint names one branch (`input.str`).
        shapes = "a string or a list of strings"
        if takes_ids:
            shapes = "a string, a list of strings, a list of token ids (integers) or a list of such lists"
        return bad_request(f"'{where[0]}' must be {shapes}", where[0])
    message = f"{'.'.join(where) + ': ' if where else ''}{first.get('msg', 'invalid request')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problems)"
    return bad_request(message, where[0] if where else None)


def ectrans_headers(request: Request) -> dict[str, str]:
    """The `X-ECTrans-*` headers, in one pass over the raw ones (the ASGI server lowercases names):
    `request.headers.get` costs a raised and caught KeyError for each header that is absent."""
    raw: list[tuple[bytes, bytes]] = request.scope["headers"]
    # UTF-8, as clients send non-ASCII text (`réaltime`): Latin-1 would echo it garbled in the error.
    return {name.decode(): value.decode("utf-8", "replace") for name, value in raw if name.startswith(b"x-ectrans-")}


def request_options(request: Request, priority: str | None, deadline_ms: int | None) -> tuple[str | None, int | None]:
    """`priority` and `deadline_ms` from the body, else from the `X-ECTrans-*` headers."""
    headers = ectrans_headers(request)
    if priority is None:
        priority = headers.get(PRIORITY_HEADER)
        if priority is not None and priority not in ("realtime", "batch"):
            raise bad_request(f"header {PRIORITY_HEADER} must be realtime or batch, got {priority[:40]!r}", "priority")
    if deadline_ms is None:
        header = headers.get(DEADLINE_HEADER)
        if header is not None:
            # ASCII digits only, and few: int() refuses other Unicode digits ('²') and 4,300 digits and more.
            digits = header.strip()
            if (
                not (digits.isascii() and digits.isdigit() and len(digits) <= 9)
                or not 1 <= int(digits) <= MAX_DEADLINE_MS
            ):
                raise bad_request(f"header {DEADLINE_HEADER} must be a whole number of ms, got {header[:40]!r}")
            deadline_ms = int(digits)
    return priority, deadline_ms


def text_inputs(value: object, limit: int, param: str) -> list[str]:
    """A list of texts from a string or a list of strings; token ids, empty lists and texts that are
    not valid Unicode (lone surrogates) are refused."""
    texts = [value] if isinstance(value, str) else value
    assert isinstance(texts, list)
    if not texts:
        raise GatewayError(400, f"'{param}' is an empty list", Reason.BAD_INPUT, param, tei_type="Empty")
    if not all(isinstance(text, str) for text in texts):
        raise bad_request(f"'{param}' takes text here, not token ids", param)
    if len(texts) > limit:
        raise too_many_inputs(len(texts), limit, param)
    for index, text in enumerate(texts):
        if not text:
            which = f"'{param}'" if isinstance(value, str) else f"{param}[{index}]"
            raise GatewayError(400, f"{which} is an empty string", Reason.BAD_INPUT, param, tei_type="Empty")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise bad_request(f"{param}[{index}] is not valid Unicode text", param) from None
    return texts


def vector(result: TaskResult) -> np.ndarray:
    """An embedding from a task's output; the no-op model's `{"chars": n}` becomes the vector [n]."""
    output = result.output
    if isinstance(output, dict):
        return np.asarray([float(output.get("chars", 0))], dtype=np.float32)
    return np.asarray(output, dtype=np.float32)


def as_base64(vector: np.ndarray) -> str:
    """OpenAI's `encoding_format: base64`: little-endian float32 bytes."""
    return base64.b64encode(vector.astype("<f4").tobytes()).decode()


def tei_truncate(body: EmbedRequest, model_truncates: bool) -> bool:
    """TEI's truncation options as the one flag ECTrans has (null: the model entry's `truncate`)."""
    truncate = bool(body.truncate)
    cuts = model_truncates if body.truncate is None else truncate
    if cuts and (body.truncation_direction or "right").lower() == "left":
        raise bad_request("only right truncation is supported", "truncation_direction")
    return truncate


def tei_vectors(rows: list[np.ndarray], body: EmbedRequest, model: str) -> np.ndarray:
    """TEI's answer: the first `dimensions` components (Matryoshka), then L2-normalised if asked."""
    vectors = np.stack(rows)
    if body.dimensions is not None:
        if body.dimensions > vectors.shape[1]:
            message = f"dimensions {body.dimensions} is over the {vectors.shape[1]} of model {model!r}"
            raise bad_request(message, "dimensions")
        vectors = vectors[:, : body.dimensions]
    if body.normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
    return vectors


def tei_info(spec: ModelSpec, settings: GatewaySettings) -> TEIInfo:
    """What TEI's `/info` says of its model, from the registry entry."""
    return TEIInfo(
        model_id=spec.name,
        model_sha=spec.revision or None,
        model_dtype=spec.dtype,
        served_model_name=spec.name,
        model_type=TEIModelType(embedding=EmbeddingModelInfo(pooling=pooling_mode(spec.path))),
        max_concurrent_requests=settings.gateway_max_concurrent_requests,
        max_input_length=spec.max_tokens,
        max_batch_tokens=int(spec.batching.get("token_budget", 0)) or spec.max_tokens * settings.gateway_max_inputs,
        max_client_batch_size=settings.gateway_max_inputs,
        auto_truncate=spec.truncate,
        tokenization_workers=1,
        version=__version__,
    )


def pooling_mode(model_dir: Path) -> str:
    """The pooling the model's workers apply (`mean` where its directory cannot be read here)."""
    try:
        return declared_pooling(model_dir)[0]
    except (OSError, ValueError, AttributeError):
        return "mean"


def create_app(
    settings: GatewaySettings, registry: dict[str, ModelSpec], *, instance: str = "gateway-0", address: str = ""
) -> ASGIApp:
    """The FastAPI app behind the gateway's two pure ASGI layers (see middleware.py). They wrap it from
    outside rather than through `add_middleware`, which would put FastAPI's own outer layers (server
    errors, telemetry, body limit) on every task request's path."""
    metrics = GatewayMetrics(registry)
    gateway = Gateway(settings, registry, metrics, instance)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        logger.info("[start] gateway %s ready on %s (API docs at /docs)", instance, address or "its socket")
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(
        title="ECTrans gateway",
        version=__version__,
        description="OpenAI- and TEI-compatible HTTP endpoints in front of ECTrans's task streams.",
        lifespan=lifespan,
        # `/v1/embeddings/` is a 404 in the API's shape, as OpenAI and TEI answer it: FastAPI's default
        # 307 carried no body and pointed at an origin made from the request's Host header.
        redirect_slashes=False,
    )
    app.state.gateway = gateway
    install_error_handlers(app, gateway.store)
    endpoints = add_task_routes(app, gateway)
    add_model_and_probe_routes(app, gateway)
    return Guard(
        Shortcut(app, endpoints=endpoints),
        api_keys=settings.gateway_api_keys,
        max_body_bytes=settings.gateway_max_body_bytes,
        metrics=metrics,
    )


def add_task_routes(app: FastAPI, gateway: Gateway) -> dict[str, Endpoint]:
    """The task endpoints, as FastAPI routes (for the schema) and by path (for `Shortcut`)."""
    settings = gateway.settings

    openai_route = {
        "response_model": EmbeddingResponse,
        "responses": ERRORS,
        "tags": ["OpenAI"],
        "openapi_extra": request_body(EmbeddingRequest),
    }

    @app.post("/v1/embeddings", **openai_route)  # type: ignore[arg-type]
    @gateway.holding
    async def embeddings(request: Request) -> Response:
        """Embeddings, as OpenAI's API: the `openai` package works with only `base_url` changed."""
        body = await parse_body(request, EmbeddingRequest, settings.gateway_body_timeout_s)
        options = request_options(request, body.priority, body.deadline_ms)
        results, tokens = await gateway.embed(
            request, body.model, body.input, options, param="input", truncate=body.truncate, too_long_status=400
        )
        vectors = [vector(result) for result in results]
        if body.dimensions is not None and body.dimensions != vectors[0].shape[-1]:
            raise bad_request(
                f"model {body.model!r} makes {vectors[0].shape[-1]}-dimensional vectors; 'dimensions' must match",
                "dimensions",
            )
        packed = body.encoding_format == "base64"  # null: float, OpenAI's default
        encoded = [as_base64(v) if packed else v for v in vectors]  # orjson writes an array as a list
        data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(encoded)]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return json_response({"object": "list", "data": data, "model": body.model, "usage": usage})

    tei_route = {
        "response_model": list[list[float]],
        "responses": {code: {"model": TEIError} for code in (400, 413, 422, 429, 503)},
        "tags": ["TEI"],
        "openapi_extra": request_body(EmbedRequest),
    }

    @app.post("/embed", **tei_route)  # type: ignore[arg-type]
    @gateway.holding
    async def embed(request: Request) -> Response:
        """Embeddings, as Hugging Face Text Embeddings Inference: TEI clients work unchanged."""
        body = await parse_body(request, EmbedRequest, settings.gateway_body_timeout_s)
        model = body.model or settings.gateway_default_model
        spec = gateway.registry.get(model)
        truncate = tei_truncate(body, spec is not None and spec.truncate)
        options = request_options(request, body.priority, body.deadline_ms)
        # An explicit `truncate: false` refuses a long input even where the model entry cuts (as TEI's
        # `--auto-truncate` yields to the request's own setting).
        results, _ = await gateway.embed(
            request,
            model,
            body.inputs,
            options,
            param="inputs",
            truncate=truncate,
            too_long_status=413,
            entry_may_cut=body.truncate is None,
            prompt=prompt_text(body.prompt_name, spec, model),
        )
        return json_response(tei_vectors([vector(result) for result in results], body, model))

    # TEI serves an embedding model's `/embed` at `/` too: `InferenceClient(base_url=...)` posts there.
    app.post("/", **tei_route, summary="Embed (TEI's root route)")(embed)  # type: ignore[arg-type]

    @app.post(
        "/v1/translate",
        response_model=TranslateResponse,
        responses=ERRORS,
        tags=["ECTrans"],
        openapi_extra=request_body(TranslateRequest),
    )
    @gateway.holding
    async def translate(request: Request) -> Response:
        """Translation (or any generation) with an encoder-decoder model."""
        body = await parse_body(request, TranslateRequest, settings.gateway_body_timeout_s)
        texts = text_inputs(body.input, settings.gateway_max_inputs, "input")
        options = request_options(request, body.priority, body.deadline_ms)
        params = {k: v for k, v in (("num_beams", body.num_beams), ("max_new_tokens", body.max_new_tokens)) if v}
        results = await gateway.run(request, body.model, "translate", texts, options=options, params=params)
        data = [{"index": i, "text": str(r.output["text"])} for i, r in enumerate(results)]
        return json_response({"object": "list", "data": data, "model": body.model})

    # TEI serves OpenAI's route without `/v1` too: where an SDK's `base_url` lacks it.
    app.post("/embeddings", **openai_route, include_in_schema=False)(embeddings)  # type: ignore[arg-type]
    return {
        "/v1/embeddings": embeddings,
        "/embeddings": embeddings,
        "/embed": embed,
        "/": embed,
        "/v1/translate": translate,
    }


def add_model_and_probe_routes(app: FastAPI, gateway: Gateway) -> None:
    registry, metrics = gateway.registry, gateway.metrics

    def card(name: str, spec: ModelSpec, served: set[str]) -> ModelCard:
        return ModelCard(
            id=name, kind=spec.kind, ops=sorted(spec.ops), max_tokens=spec.max_tokens, served=name in served
        )

    @app.get("/v1/models", response_model=ModelList, tags=["OpenAI"])
    async def models() -> ModelList:
        """The registry, and which models a live worker serves now."""
        served = await gateway.served_models()
        return ModelList(data=[card(name, spec, served) for name, spec in sorted(registry.items())])

    @app.get("/v1/models/{model}", response_model=ModelCard, responses={404: ERRORS[404]}, tags=["OpenAI"])
    async def model(model: str) -> ModelCard:
        """One registry entry (the OpenAI SDK's `models.retrieve`)."""
        spec = registry.get(model)
        if spec is None:
            raise unknown_model(model)
        return card(model, spec, await gateway.served_models())

    @app.get("/info", response_model=TEIInfo, tags=["TEI"])
    async def info() -> Response:
        """TEI's `/info`, for the model `/embed` serves when a request names none."""
        model = gateway.settings.gateway_default_model
        spec = registry.get(model)
        if spec is None:
            raise GatewayError(404, f"the default model {model!r} is not in the registry", Reason.UNKNOWN_MODEL)
        return json_response(tei_info(spec, gateway.settings).model_dump())

    @app.get("/health", tags=["probes"])
    async def health() -> dict[str, str]:
        """The process is up (a liveness probe)."""
        return {"status": "ok"}

    # TEI answers `GET /` as its health check.
    app.get("/", tags=["probes"], summary="Health (TEI's root route)")(health)

    @app.get("/ready", tags=["probes"], responses={503: {"description": "not ready"}})
    async def ready() -> Response:
        """Redis answers and a live worker serves a model (a readiness probe)."""
        try:
            served = await gateway.served_models()
        except RedisError as exc:  # no address in the answer: probes need no key
            return json_response({"status": "unready", "reason": gateway.store.failed(exc).message}, 503)
        except GatewayError as exc:
            return json_response({"status": "unready", "reason": exc.message}, 503)
        if not served:
            return json_response({"status": "unready", "reason": "no live worker serves a model"}, 503)
        return json_response({"status": "ready", "models": sorted(served)})

    @app.get("/metrics", tags=["probes"])
    async def prometheus_metrics() -> Response:
        """The gateway's own figures (Prometheus text format)."""
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def install_error_handlers(app: FastAPI, store: StoreHealth) -> None:
    """Every error in one of two shapes (TEI's on `/embed` and `/`), and never a stack trace."""

    def is_tei(request: Request) -> bool:
        return request.url.path in TEI_PATHS

    async def gateway_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        return render(exc, tei=is_tei(request))

    async def invalid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return render(invalid_request(exc.errors()), tei=is_tei(request))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        codes = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
        code = codes.get(exc.status_code, "bad_request")
        message = str(exc.detail)
        if exc.status_code == 404:  # OpenAI's wording, naming what was asked for
            message = f"Invalid URL ({request.method} {request.url.path[:200]})"
        error = GatewayError(exc.status_code, message, code, headers=dict(exc.headers or {}))  # 405's `Allow`
        return render(error, tei=is_tei(request))

    async def redis_failed(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RedisError)
        return render(store.failed(exc), tei=is_tei(request))

    async def unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("[gateway] unexpected error on %s", request.url.path)
        return render(GatewayError(500, "internal error", Reason.INTERNAL), tei=is_tei(request))

    app.add_exception_handler(GatewayError, gateway_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RedisError, redis_failed)
    app.add_exception_handler(Exception, unexpected)
