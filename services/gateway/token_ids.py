"""Pre-tokenized input, as OpenAI's and TEI's embedding APIs take it: one list of token ids, or a list
of such lists. The ids reach the model as they are, as TEI uses them: each input becomes a split task
resumed after the tokenizer (split point 1, see `common/split.py`), never text decoded from the ids
and tokenized again, which need not give back the same ids."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ectrans.common.registry import ModelSpec
from ectrans.common.schemas import Reason
from ectrans.common.split import EMBED, pack_activation
from ectrans.services.gateway.errors import GatewayError, bad_request, too_long_input, too_many_inputs, unknown_model

MAX_ID = 2**31  # split payloads carry int32 ids


def shown(token_id: int) -> str:
    """An id for a message: a 4,000-digit one (JSON allows it) would make the message 4,000 characters."""
    return str(token_id) if abs(token_id) < 2**63 else "of over 64 bits"


def token_id_rows(value: object) -> list[list[int]] | None:
    """The inputs of a parsed `input`/`inputs` field as lists of token ids; None where it holds text.
    The field's type (protocol.py) leaves a list of ints (one input) or a list of lists of ints."""
    if not isinstance(value, list) or not value or isinstance(value[0], str):
        return None
    if isinstance(value[0], int):
        return [value]
    return value


@dataclass(frozen=True)
class TokenIdTasks:
    """What the gateway submits for token-id inputs: one split payload per input."""

    payloads: list[bytes]
    tokens: int  # OpenAI's `usage`: the ids sent to the model, after any cut
    revision: str
    segment: int = EMBED


def token_id_tasks(
    rows: list[list[int]],
    spec: ModelSpec | None,
    model: str,
    *,
    limit: int,
    param: str,
    cut: bool,
    too_long_status: int,
) -> TokenIdTasks:
    """Check token-id inputs against `spec` (count, vocabulary, token limit; an input over the limit is
    cut to it where `cut`) and pack them. The checks are the gateway's, so that each problem is named
    in the request's terms (`input[2]`); the dispatcher checks every split payload again."""
    if len(rows) > limit:
        raise too_many_inputs(len(rows), limit, param)
    for index, row in enumerate(rows):  # what no model takes, checked before the model is looked up
        if not row:
            empty = f"{param}[{index}] is an empty list of token ids"
            raise GatewayError(400, empty, Reason.BAD_INPUT, param, tei_type="Empty")
        low, high = min(row), max(row)
        if low < 0 or high >= MAX_ID:
            raise bad_request(
                f"{param}[{index}] holds token id {shown(low if low < 0 else high)}, in no vocabulary", param
            )
    if spec is None:
        # Ids mean something only in a known model's vocabulary, and a split task names its revision.
        raise unknown_model(model, "token ids need a model of the gateway's registry")
    if spec.kind != "encoder" or spec.num_layers <= 0 or spec.vocab_size <= 0:
        raise bad_request(f"model {model!r} takes text, not token ids", param)
    payloads = []
    tokens = 0
    for index, row in enumerate(rows):
        if max(row) >= spec.vocab_size:
            raise bad_request(
                f"{param}[{index}] holds token id {max(row)}, outside the vocabulary of model {model!r}"
                f" (0 to {spec.vocab_size - 1})",
                param,
            )
        if len(row) > spec.max_tokens and not cut:
            raise too_long_input(index, len(row), model, spec.max_tokens, status=too_long_status, param=param)
        kept = row[: spec.max_tokens]
        tokens += len(kept)
        payloads.append(pack_activation(EMBED, np.asarray(kept, dtype=np.int32)))
    return TokenIdTasks(payloads, tokens, spec.revision)
