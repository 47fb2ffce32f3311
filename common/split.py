"""The split-task contract: what a client sends when it ran the first units of a model itself.

A model is a chain of units: `tokenize`, `embed`, one unit per encoder layer, then the head
(pooling for an encoder; final norm and decoding for an encoder-decoder). A split task at point
`k` (its `segment` field, 1 <= k <= layers + 2) carries the state after units[0:k] as a msgpack
payload in its `input` field, and the server runs units[k:]. `k = 0` is a plain text task; the
client running every unit sends nothing at all.

The payload is one sequence, unpadded: `ids` (its token ids), `types` (token type ids, optional)
and, from `k = 2` on, `hidden` (`[tokens, hidden_size]`, float32 or float16). A task also names
the model `revision` it was computed with; a different revision or a point the model does not
have gets a `version_mismatch` error, never a wrong answer. Pure numpy: the dispatcher checks
tasks without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ectrans.common import codec
from ectrans.common.registry import ModelSpec
from ectrans.common.schemas import Reason, Task, TaskError

SPLIT_FORMAT = 1
TOKENIZE, EMBED, FIRST_LAYER = 0, 1, 2
HIDDEN_DTYPES = ("float32", "float16")
FLOAT16_MAX = float(np.finfo(np.float16).max)


class SplitError(ValueError):
    """A split payload that cannot be resumed; the message says why."""


def unit_count(num_layers: int) -> int:
    """Units of a model with `num_layers` (encoder) layers: tokenize, embed, the layers, the head."""
    return num_layers + 3


def head_unit(num_layers: int) -> int:
    return num_layers + 2


def unit_names(num_layers: int, kind: str) -> list[str]:
    head = "decode" if kind == "seq2seq" else "pool"
    return ["tokenize", "embed", *(f"layer{i}" for i in range(num_layers)), head]


def check_point(segment: int, num_layers: int, model: str) -> None:
    """Raise SplitError unless the server can resume `model` at split point `segment`."""
    if num_layers <= 0:
        raise SplitError(f"model {model!r} does not take split tasks")
    if not 1 <= segment <= head_unit(num_layers):
        last = head_unit(num_layers)
        raise SplitError(f"segment {segment} is not a split point of model {model!r}: it has 1..{last}")


@dataclass(frozen=True)
class Activation:
    """One sequence's state at split point `segment`."""

    segment: int
    ids: np.ndarray[Any, Any] | None
    types: np.ndarray[Any, Any] | None
    hidden: np.ndarray[Any, Any] | None

    @property
    def tokens(self) -> int:
        if self.hidden is not None:
            return int(self.hidden.shape[0])
        return 0 if self.ids is None else int(self.ids.shape[0])

    def check(self, segment: int, spec: ModelSpec, max_tokens: int) -> None:
        """What the server needs at `segment` of model `spec`: ids before the embeddings (and always
        for a decoder's search), hidden states of the model's width after them, within the token
        limit; and nothing a kernel could index out of range or overflow (ids within the
        vocabulary, type ids within the model's types, values within the model's dtype), since on
        a GPU such input is a device-side assert that poisons the whole process's CUDA context."""
        if self.tokens == 0:
            raise SplitError("the payload holds no tokens")
        if self.tokens > max_tokens:
            raise SplitError(f"the payload holds {self.tokens} tokens, over the model's limit of {max_tokens}")
        needs_ids = spec.kind == "seq2seq"  # the decoder's search reads the source ids
        if (segment == EMBED or needs_ids) and self.ids is None:
            raise SplitError(f"split point {segment} needs the token ids ('ids')")
        if self.ids is not None and int(self.ids.max()) >= spec.vocab_size:
            raise SplitError(f"'ids' holds token ids outside the model's vocabulary of {spec.vocab_size}")
        if self.types is not None and self.types.size and int(self.types.max()) >= max(spec.type_vocab_size, 1):
            raise SplitError(f"'types' holds token type ids outside the model's {max(spec.type_vocab_size, 1)}")
        if segment == EMBED and self.hidden is not None:
            raise SplitError("split point 1 (after tokenisation) takes token ids, not hidden states")
        if segment > EMBED:
            if self.hidden is None:
                raise SplitError(f"split point {segment} needs hidden states ('hidden')")
            if int(self.hidden.shape[1]) != spec.hidden_size:
                raise SplitError(f"hidden states are {self.hidden.shape[1]} wide; the model's are {spec.hidden_size}")
            if spec.dtype == "float16" and float(np.abs(self.hidden).max()) > FLOAT16_MAX:
                raise SplitError(f"'hidden' holds values beyond float16's range (±{FLOAT16_MAX:.0f}) of the model")


def pack_activation(
    segment: int,
    ids: np.ndarray[Any, Any] | None,
    hidden: np.ndarray[Any, Any] | None = None,
    types: np.ndarray[Any, Any] | None = None,
) -> bytes:
    body: dict[str, Any] = {"format": SPLIT_FORMAT, "segment": segment}
    if ids is not None:
        body["ids"] = np.asarray(ids, dtype=np.int32)
    if types is not None:
        body["types"] = np.asarray(types, dtype=np.int32)
    if hidden is not None:
        body["hidden"] = hidden
    return codec.packb(body)


def unpack_activation(payload: bytes, max_bytes: int = codec.MAX_PAYLOAD_BYTES) -> Activation:
    """Decode an untrusted payload (shapes and dtypes checked, nothing else allocated)."""
    try:
        body = codec.unpackb(payload, max_bytes=max_bytes)
    except codec.CodecError as exc:
        raise SplitError(f"the split payload is not valid: {exc}") from None
    if not isinstance(body, dict):
        raise SplitError("the split payload must be a map")
    if body.get("format") != SPLIT_FORMAT:
        raise SplitError(f"split payload format {body.get('format')!r} is not {SPLIT_FORMAT}")
    segment = body.get("segment")
    if type(segment) is not int:
        raise SplitError("the split payload must name its split point ('segment')")
    ids, types = _int_vector(body, "ids"), _int_vector(body, "types")
    hidden = body.get("hidden")
    if hidden is not None:
        if not isinstance(hidden, np.ndarray) or hidden.ndim != 2 or hidden.dtype.name not in HIDDEN_DTYPES:
            raise SplitError(f"'hidden' must be a [tokens, hidden] array of {' or '.join(HIDDEN_DTYPES)}")
        if not np.isfinite(hidden).all():
            raise SplitError("'hidden' holds NaN or infinite values")
    activation = Activation(segment, ids, types, hidden)
    lengths = {len(a) for a in (ids, types, hidden) if a is not None}
    if len(lengths) > 1:
        raise SplitError(f"'ids', 'types' and 'hidden' disagree on the token count: {sorted(lengths)}")
    return activation


def _int_vector(body: dict[str, Any], name: str) -> np.ndarray[Any, Any] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, np.ndarray) or value.ndim != 1 or value.dtype.kind not in "iu":
        raise SplitError(f"{name!r} must be a 1-D integer array")
    if value.size and (int(value.min()) < 0 or int(value.max()) >= 2**31):
        raise SplitError(f"{name!r} holds ids out of range")
    return value


def check_split(task: Task, spec: ModelSpec, max_bytes: int = codec.MAX_PAYLOAD_BYTES) -> Activation:
    """The payload of split task `task` if `spec` can resume it, else a TaskError: `version_mismatch`
    for another revision or a point the model does not have, `bad_input` for a malformed payload."""
    try:
        if task.revision != spec.revision:
            raise TaskError(
                Reason.VERSION_MISMATCH,
                f"the task was computed with revision {task.revision!r:.40} of model {spec.name!r}; "
                f"this node serves revision {spec.revision!r}",
            )
        check_point(task.segment, spec.num_layers, spec.name)
    except SplitError as exc:
        raise TaskError(Reason.VERSION_MISMATCH, str(exc)) from None
    try:
        activation = unpack_activation(task.payload, max_bytes)
    except SplitError as exc:
        raise TaskError(Reason.BAD_INPUT, str(exc)) from None
    if activation.segment != task.segment:
        raise TaskError(
            Reason.VERSION_MISMATCH,
            f"the payload holds the state at split point {activation.segment}; the task says {task.segment}",
        )
    try:
        activation.check(task.segment, spec, spec.max_tokens)
    except SplitError as exc:
        raise TaskError(Reason.BAD_INPUT, str(exc)) from None
    return activation
