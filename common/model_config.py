"""The schema of one models-file entry (`[models.<name>]` in TOML, or the same in JSON).

Strict: an unknown key (`dytpe = "float16"`) or a value of the wrong type is an error naming the
file, the model and the key, never an option quietly ignored. Batching keys override the worker's
`ECTRANS_*` defaults for this model alone: one setting cannot fit a 22M and a 600M model alike.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

DTYPES = ("float32", "float16", "bfloat16")
# Keys of an entry that override the worker's setting of the same name for this model.
BATCHING_KEYS = (
    "rt_max_batch",
    "rt_max_wait_ms",
    "batch_max_batch",
    "batch_max_wait_ms",
    "token_budget",
    "batch_segment_ms",
    "batch_max_padding",
    "segments",
)
# Keys handed to the model layer as `ModelSpec.options`.
OPTION_KEYS = (
    "attn_implementation",
    "decode_segments",
    "default_num_beams",
    "max_num_beams",
    "default_max_new_tokens",
    "max_new_tokens",
    "delay_ms",
)


class ModelEntry(BaseModel):
    """One model of the registry. Every key is optional but `path` (or `kind = "noop"`)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    kind: Literal["noop"] | None = Field(None, description="`noop`: no weights, measures the serving path alone.")
    path: str | None = Field(None, description="A local Hugging Face model directory (never fetched from a hub).")
    ops: list[str] | None = Field(None, description="Ops served; default from the architecture.")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    max_tokens: int | None = Field(None, ge=1, description="Input limit in tokens; default from the model's config.")
    truncate: bool = Field(False, description="Cut over-long inputs at `max_tokens` instead of refusing them.")
    # The model layer's options.
    attn_implementation: str | None = None
    decode_segments: int | None = Field(None, ge=1)
    default_num_beams: int | None = Field(None, ge=1)
    max_num_beams: int | None = Field(None, ge=1)
    default_max_new_tokens: int | None = Field(None, ge=1)
    max_new_tokens: int | None = Field(None, ge=1)
    delay_ms: float | None = Field(None, ge=0, le=60_000, description="noop only: each batch takes this long.")
    # Batching, over the worker-wide defaults of the same names.
    rt_max_batch: int | None = Field(None, ge=1)
    rt_max_wait_ms: float | None = Field(None, ge=0)
    batch_max_batch: int | None = Field(None, ge=1)
    batch_max_wait_ms: float | None = Field(None, ge=0)
    token_budget: int | None = Field(None, ge=64)
    batch_segment_ms: float | None = Field(None, ge=0)
    batch_max_padding: float | None = Field(None, ge=0)
    segments: int | None = Field(None, ge=1)

    def options(self) -> dict[str, Any]:
        return {key: value for key in OPTION_KEYS if (value := getattr(self, key)) is not None}

    def batching(self) -> dict[str, Any]:
        return {key: value for key in BATCHING_KEYS if (value := getattr(self, key)) is not None}


def entry_error(exc: ValidationError) -> str:
    """The first problem of a rejected entry as `key: what is wrong` (with a suggestion for a typo)."""
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "entry"
        if error["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, ModelEntry.model_fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"unknown key {key!r}{hint}")
        else:
            problems.append(f"{key!r}: {error['msg']} (got {error['input']!r})")
    return "; ".join(problems)
