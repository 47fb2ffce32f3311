"""Request and response shapes of the HTTP API, apart from the handlers (as vLLM keeps them).

`/v1/embeddings` follows OpenAI's embeddings API, `/embed` Hugging Face TEI's; both take ECTrans's
own `priority` and `deadline_ms` as extra fields. Unknown fields are refused, so a typo is a 400,
not a silently ignored option; so are values of the wrong JSON type (`"deadline_ms": true` or
`"100"`, `"normalize": "false"`), which lax parsing would turn into a value the client never meant.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from ectrans.common.schemas import MAX_DEADLINE_MS, OP_PARAMS

Priority = Literal["realtime", "batch"]
Deadline = Annotated[int, Field(ge=1, le=MAX_DEADLINE_MS)]
# Wider than any model's vectors; the bound keeps a 4,000-digit value (JSON allows it) out of messages.
MAX_DIMENSIONS = 1 << 16
# OpenAI's `input` and TEI's `inputs` may also be token ids of the model's vocabulary (see token_ids.py).
TokenIds = list[int]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ECTransOptions(Strict):
    """ECTrans's own request fields (also accepted as `X-ECTrans-Priority`/`X-ECTrans-Deadline-Ms` headers)."""

    priority: Priority | None = Field(None, description="`realtime` or `batch`; by default the server classifies.")
    deadline_ms: Deadline | None = Field(None, description="Deadline relative to submission, in milliseconds.")


class EmbeddingRequest(ECTransOptions):
    """OpenAI `POST /v1/embeddings`."""

    input: str | list[str] | TokenIds | list[TokenIds] = Field(
        description="Text, a list of texts, token ids of the model's vocabulary, or a list of such lists."
    )
    model: str = Field(description="A model name from the registry (see `GET /v1/models`).")
    encoding_format: Literal["float", "base64"] | None = Field(
        "float", description="`base64`: little-endian float32 bytes, base64-encoded (null: `float`)."
    )
    dimensions: int | None = Field(
        None, ge=1, le=MAX_DIMENSIONS, description="Only the model's own dimension is accepted."
    )
    user: str | None = Field(None, description="Accepted and ignored, as an end-user id for OpenAI's logs.")
    truncate: bool = Field(False, description="Cut over-long inputs to the model's limit instead of refusing them.")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class EmbedRequest(ECTransOptions):
    """Hugging Face TEI `POST /embed`."""

    inputs: str | list[str] | TokenIds | list[TokenIds] = Field(
        description="Text, a list of texts, token ids of the model's vocabulary, or a list of such lists."
    )
    normalize: bool = Field(True, description="L2-normalise each vector (after `dimensions`).")
    truncate: bool | None = Field(
        None,
        description="Cut over-long inputs to the model's limit instead of refusing them (null: the model's setting).",
    )
    truncation_direction: Literal["Right", "right", "Left", "left"] | None = Field(
        "Right",
        description="Only `Right` is supported when `truncate` is set (null: `Right`, as clients that send every"
        " field, set or not, write it).",
    )
    prompt_name: str | None = Field(
        None, description="A prompt of the model's sentence-transformers configuration, put before each text."
    )
    dimensions: int | None = Field(
        None, ge=1, le=MAX_DIMENSIONS, description="Keep the first `dimensions` components, as TEI does."
    )
    model: str | None = Field(None, description="ECTrans extension: the model (default: the gateway's default model).")


class TranslateRequest(ECTransOptions):
    """`POST /v1/translate`: encoder-decoder models (translation, summarisation)."""

    model: str = Field(description="A seq2seq model name from the registry.")
    input: str | list[str] = Field(
        validation_alias=AliasChoices("input", "inputs"), description="Text or texts (`inputs` also accepted)."
    )
    num_beams: int | None = Field(None, ge=OP_PARAMS["num_beams"][0], le=OP_PARAMS["num_beams"][1])
    max_new_tokens: int | None = Field(None, ge=OP_PARAMS["max_new_tokens"][0], le=OP_PARAMS["max_new_tokens"][1])


class Translation(BaseModel):
    index: int
    text: str


class TranslateResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Translation]
    model: str


class ModelCard(BaseModel):
    """One registry entry, OpenAI-style, with what ECTrans knows of it."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "ectrans"
    kind: str = Field(description="`encoder`, `seq2seq` or `noop`.")
    ops: list[str]
    max_tokens: int
    served: bool = Field(description="True while at least one live worker serves it.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, used by every endpoint but `/embed`."""

    error: ErrorDetail


class EmbeddingModelInfo(BaseModel):
    pooling: str


class TEIModelType(BaseModel):
    embedding: EmbeddingModelInfo


class TEIInfo(BaseModel):
    """TEI's `GET /info`, for the gateway's default model (the one `/embed` serves without `model`)."""

    model_id: str
    model_sha: str | None = None
    model_dtype: str
    served_model_name: str
    model_type: TEIModelType
    max_concurrent_requests: int
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int | None = None
    max_client_batch_size: int
    auto_truncate: bool
    tokenization_workers: int
    version: str
    sha: str | None = None
    docker_label: str | None = None


class TEIError(BaseModel):
    """TEI's error shape, used by `/embed`."""

    error: str
    error_type: str
