"""Encoder-only models (BERT, RoBERTa, XLM-R, DistilBERT) split into segments.

A model becomes `embeddings + layers[a:b]`, `layers[b:c]`, ..., `layers[y:z] + pooling`. Only the
2-D padding mask travels between segments; each segment rebuilds the 4-D mask its attention
implementation wants (bool for sdpa, additive float for eager, None when nothing is padded) with
`transformers.masking_utils.create_bidirectional_mask`, exactly as the unsplit model does, so the
segmented output equals the unsplit one bit for bit (with traced layers, `traced.py`, each
trace is checked against its layer at load within 1e-5; equal in every test).
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from ectrans.common.split import EMBED, FIRST_LAYER
from ectrans.models.pooling_config import POOLING_MODES, declared_pooling
from ectrans.models.segments import SegmentState
from ectrans.models.traced import LayerCall, layer_output, trace_layers

# Families whose layers take (hidden, 4-D mask) and nothing else; others (MPNet's relative bias,
# ELECTRA's embedding projection) would run without error and compute the wrong thing.
SUPPORTED_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "distilbert"})


class UnsupportedModelError(ValueError):
    """The model's architecture has no segment splitter."""


@dataclass(frozen=True)
class EncoderParts:
    """The pieces of an encoder a segment needs, located once."""

    config: Any  # transformers.PretrainedConfig
    embeddings: nn.Module
    layers: nn.ModuleList
    takes_token_types: bool
    calls: Sequence[LayerCall] = ()  # how each layer runs: traced (traced.py) or eager; () eager

    def run_layer(self, index: int, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.calls:
            return self.calls[index](hidden, mask)
        return layer_output(self.layers[index](hidden, mask))

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def encoder_parts(model: nn.Module) -> EncoderParts:
    base: Any = getattr(model, "base_model", model)
    config = base.config
    if config.model_type not in SUPPORTED_TYPES:
        raise UnsupportedModelError(
            f"model type {config.model_type!r} cannot be segmented; supported: {sorted(SUPPORTED_TYPES)}"
        )
    stack = base.transformer if config.model_type == "distilbert" else base.encoder
    embeddings = base.embeddings
    takes_token_types = "token_type_ids" in inspect.signature(embeddings.forward).parameters
    return EncoderParts(config, embeddings, stack.layer, takes_token_types)


@dataclass(frozen=True)
class Pooling:
    """Sentence embedding from token states: sentence-transformers' pooling, then L2 normalisation."""

    mode: str = "mean"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise ValueError(f"{self.mode=} must be one of {POOLING_MODES}")

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Reduce in float32 for half-precision models, as sentence-transformers does.
        states = hidden.float()
        weights = mask.unsqueeze(-1).to(states.dtype)
        if self.mode == "cls":
            pooled = states[:, 0]
        elif self.mode == "max":
            pooled = states.masked_fill(weights == 0, float("-inf")).max(dim=1).values
        else:
            pooled = (states * weights).sum(dim=1) / torch.clamp(weights.sum(dim=1), min=1e-9)
        if self.normalize:
            pooled = nn.functional.normalize(pooled, p=2, dim=1)
        return pooled


def read_pooling(model_dir: Path) -> Pooling:
    """The pooling a sentence-transformers directory declares; mean + normalise for a plain model."""
    mode, normalize = declared_pooling(model_dir)
    return Pooling(mode=mode, normalize=normalize)


class EncoderSegment:
    """Layers `layers` of an encoder, with the embeddings in front (first segment) and the pooling
    behind (last segment). Keeps no per-batch state: everything travels in the `SegmentState`."""

    def __init__(self, parts: EncoderParts, layers: range, *, embed: bool, pooling: Pooling | None = None) -> None:
        self.parts = parts
        self.layers = tuple(layers)
        self.embed = embed
        self.pooling = pooling
        span = f"{layers.start}-{layers.stop - 1}" if len(layers) else "none"
        self.name = "+".join(
            part for part, present in (("embed", embed), (f"layers{span}", True), ("pool", pooling)) if present
        )

    def __call__(self, state: SegmentState) -> SegmentState:
        hidden = self._embeddings(state) if self.embed and state.start <= EMBED else state.hidden
        if hidden is None:
            raise ValueError(f"segment {self.name} needs hidden states, but the batch has none")
        layers = [index for index in self.layers if FIRST_LAYER + index >= state.start]
        if layers:
            mask_4d = create_bidirectional_mask(
                config=self.parts.config, inputs_embeds=hidden, attention_mask=state.mask
            )
            for index in layers:
                hidden = self.parts.run_layer(index, hidden, mask_4d)
        state.hidden = hidden
        if self.pooling is not None:
            state.outputs = list(self.pooling(hidden, state.mask))
        return state

    def _embeddings(self, state: SegmentState) -> torch.Tensor:
        token_types = state.extras.get("token_type_ids")
        if self.parts.takes_token_types and token_types is not None:
            return self.parts.embeddings(input_ids=state.input_ids, token_type_ids=token_types)  # type: ignore[no-any-return]
        return self.parts.embeddings(state.input_ids)  # type: ignore[no-any-return]


def even_splits(num_layers: int, n_segments: int) -> list[int]:
    """Split points (segment start indices after the first) giving segments of near-equal layer count."""
    if not 1 <= n_segments <= num_layers:
        raise ValueError(f"{n_segments=} must be between 1 and the {num_layers} layers")
    return [round(i * num_layers / n_segments) for i in range(1, n_segments)]


def build_encoder_segments(
    model: nn.Module, splits: Sequence[int] | int, pooling: Pooling | None = None, *, trace: bool = False
) -> list[EncoderSegment]:
    """Segments for `model`; `splits` is a segment count (even split) or the layer indices where
    segments 2..N start (e.g. from `profile.balance_splits`). `trace`: layers run as checked
    TorchScript traces where those hold (`traced.py`; for the CPU)."""
    parts = encoder_parts(model)
    if trace:
        calls = trace_layers(parts.config, list(parts.layers))
        if calls is not None:
            parts = dataclasses.replace(parts, calls=calls)
    points = even_splits(parts.num_layers, splits) if isinstance(splits, int) else list(splits)
    bounds = [0, *points, parts.num_layers]
    if any(b <= a for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"split points {points} must increase strictly within 1..{parts.num_layers - 1}")
    last = len(bounds) - 2
    return [
        EncoderSegment(
            parts,
            range(bounds[i], bounds[i + 1]),
            embed=i == 0,
            pooling=(pooling or Pooling()) if i == last else None,
        )
        for i in range(last + 1)
    ]


# Tokenizers without a length limit report this huge sentinel as their `model_max_length`.
_NO_LIMIT = 10**9


def token_limit(tokenizer: Any, max_tokens: int) -> int:
    """`max_tokens`, lowered to the tokenizer's own limit where it has one. The tokenizer knows the
    usable length: RoBERTa's 514 position embeddings hold 512 tokens (positions start after the
    padding index), which a limit read from the model config would overflow."""
    own = getattr(tokenizer, "model_max_length", None)
    if isinstance(own, int) and 0 < own < _NO_LIMIT:
        return min(max_tokens, own)
    return max_tokens


# A text's ids and token type ids (None where the tokenizer makes none), as `count_tokens` made them.
Counted = tuple[np.ndarray, np.ndarray | None]
# Counted texts whose ids are kept for their batch's tokenisation: above a worker's prefetch (256),
# so a text counted on arrival is still there when its batch forms; the oldest go first. Only texts
# of at most COUNTED_CHARS_PER_TOKEN characters per allowed token are kept (a text of spaces is a
# few tokens however long): the cache holds at most about COUNTED_KEPT x that many characters.
COUNTED_KEPT = 1024
COUNTED_CHARS_PER_TOKEN = 16
COUNTED_CHARS = 2**20  # and at most this many characters in all (texts counted but never batched stay)


class EncoderTokenizer:
    """Texts to the first `SegmentState`: padded, truncated at `max_tokens`.

    A fast tokenizer must not be used from two threads at once (its Rust state is borrowed per
    call), and the worker counts tokens while stage 0 tokenises, hence the lock. The worker counts
    every text's tokens when it arrives; stage 0 pads those ids instead of tokenising again.
    """

    def __init__(self, tokenizer: Any, max_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = token_limit(tokenizer, max_tokens)
        self._lock = threading.Lock()
        self._counted: OrderedDict[str, Counted] = OrderedDict()  # text -> ids from `count_tokens`
        self._counted_chars = 0
        # The shared-weights executor processes tokenise on their own: their worker only counts.
        self.keeps_counted = True

    def __call__(self, texts: list[str], params: dict[str, Any]) -> SegmentState:
        with self._lock:
            rows = self._take_counted(texts)
            if rows is None:
                encoded = self.tokenizer(
                    texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
                )
        if rows is not None:
            encoded = self._padded(rows)
        extras = {"token_type_ids": encoded["token_type_ids"]} if "token_type_ids" in encoded else {}
        return SegmentState(
            hidden=None,
            mask=encoded["attention_mask"],
            input_ids=encoded["input_ids"],
            params=dict(params),
            extras=extras,
        )

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Token counts, at most `max_tokens + 1`: a count above `max_tokens` marks a text that is too long.
        The ids of texts within the limit are kept for the batch that will carry them (`COUNTED_KEPT`)."""
        if not texts:  # a fast tokenizer fails on an empty batch
            return []
        with self._lock:
            encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_tokens + 1)
            types = encoded.get("token_type_ids")
            if self.keeps_counted:
                self._keep(texts, encoded["input_ids"], types)
        return [len(ids) for ids in encoded["input_ids"]]

    def _keep(self, texts: Sequence[str], ids: list[list[int]], types: list[list[int]] | None) -> None:
        """Keep the ids of texts within the limits; oldest out past COUNTED_KEPT or COUNTED_CHARS."""
        longest = COUNTED_CHARS_PER_TOKEN * self.max_tokens
        for index, (text, row) in enumerate(zip(texts, ids, strict=True)):
            if len(row) > self.max_tokens or len(text) > longest:
                continue
            if text in self._counted:
                self._counted.move_to_end(text)
                continue
            type_ids = None if types is None else np.asarray(types[index], dtype=np.int64)
            self._counted[text] = (np.asarray(row, dtype=np.int64), type_ids)
            self._counted_chars += len(text)
        while len(self._counted) > COUNTED_KEPT or self._counted_chars > COUNTED_CHARS:
            text, _ = self._counted.popitem(last=False)
            self._counted_chars -= len(text)

    def _take_counted(self, texts: list[str]) -> list[Counted] | None:
        """The counted ids of every text, or None when one is missing (a text twice in the batch: its
        ids were kept once). Either way the batch's texts leave the cache."""
        rows = [self._counted.pop(text, None) for text in texts]
        self._counted_chars -= sum(len(text) for text, row in zip(texts, rows, strict=True) if row is not None)
        if self.tokenizer.pad_token_id is None or any(row is None for row in rows):
            return None
        return [row for row in rows if row is not None]

    def _padded(self, rows: list[Counted]) -> dict[str, torch.Tensor]:
        """What the tokenizer returns for the batch with `padding=True` (its padding side and id), from
        ids it made before: on a lone client's path this saves tokenising the text a second time."""
        width = max(len(ids) for ids, _ in rows)
        input_ids = np.full((len(rows), width), self.tokenizer.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        types = np.zeros((len(rows), width), dtype=np.int64)
        left = self.tokenizer.padding_side == "left"
        for row, (ids, type_ids) in enumerate(rows):
            span = slice(width - len(ids), width) if left else slice(0, len(ids))
            input_ids[row, span] = ids
            mask[row, span] = 1
            if type_ids is not None:
                types[row, span] = type_ids
        encoded = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
        if rows[0][1] is not None:
            encoded["token_type_ids"] = torch.from_numpy(types)
        return encoded


def embed_unsplit(model: nn.Module, state: SegmentState, pooling: Pooling) -> torch.Tensor:
    """The reference: the whole model in one call, then the same pooling."""
    kwargs: dict[str, torch.Tensor] = {"input_ids": state.input_ids, "attention_mask": state.mask}
    if "token_type_ids" in state.extras and encoder_parts(model).takes_token_types:
        kwargs["token_type_ids"] = state.extras["token_type_ids"]
    hidden = model(**kwargs).last_hidden_state
    return pooling(hidden, state.mask)
