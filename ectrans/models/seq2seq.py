"""Encoder-decoder models (Marian, BART, mBART, Pegasus, T5, mT5) split into segments.

The encoder becomes `embeddings + layers[a:b]`, ..., `layers[y:z] + final norm`; only the 2-D
padding mask travels, and each segment rebuilds the 4-D mask with
`transformers.masking_utils.create_bidirectional_mask` as the unsplit encoder does, so encoder
states match it bit for bit. T5's relative position bias, computed by its first layer, travels in
`SegmentState.extras["position_bias"]` until the encoder ends.

Then come one or more decode segments: greedy or beam search over a KV cache (see `generation`),
whose tokens equal `model.generate(..., do_sample=False)`. With several decode segments each runs
its share of `max_new_tokens` steps and leaves the search in `extras["search"]`, so real-time work
can cut in between decoding chunks too. The last one sets `outputs`: one
`{"text": str, "token_ids": list[int]}` per input, the ids as `generation` defines them.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from ectrans.common.registry import ModelSpec
from ectrans.common.split import EMBED, FIRST_LAYER
from ectrans.models.beam_search import BeamSearch
from ectrans.models.encoder import EncoderTokenizer, UnsupportedModelError, even_splits
from ectrans.models.generation import DecoderInputs, DecodeSettings, GreedySearch, Search
from ectrans.models.generation_params import GenerationLimits, parse_generation_params
from ectrans.models.segments import Segment, SegmentState

# Sinusoidal position tables take a shape, learned ones (BART, mBART) a [batch, tokens] tensor.
_POSITIONS_FROM_SHAPE = {"marian": True, "pegasus": True, "bart": False, "mbart": False}
_T5_TYPES = frozenset({"t5", "mt5"})
SUPPORTED_TYPES = frozenset(_POSITIONS_FROM_SHAPE) | _T5_TYPES
POSITION_BIAS = "position_bias"
SEARCH = "search"


@dataclass(frozen=True)
class EncoderStack:
    """An encoder's pieces, located once; `embed`, `layer` and `finish` repeat what its forward does."""

    module: Any  # a transformers encoder; its submodules' names differ by family
    layers: nn.ModuleList
    is_t5: bool
    positions_from_shape: bool = False

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        module = self.module
        embeds: torch.Tensor = module.embed_tokens(input_ids)
        if self.is_t5:
            return embeds
        if hasattr(module, "embed_scale"):  # BART-style scaled embeddings scale inside embed_tokens instead
            embeds = embeds * module.embed_scale
        hidden: torch.Tensor
        if self.positions_from_shape:
            hidden = embeds + module.embed_positions(embeds.shape[:-1])
        else:
            hidden = embeds + module.embed_positions(embeds[:, :, -1]).to(embeds.device)
        if hasattr(module, "layernorm_embedding"):
            hidden = module.layernorm_embedding(hidden)
        return hidden

    def layer(self, index: int, hidden: torch.Tensor, mask: Any, extras: dict[str, Any]) -> torch.Tensor:
        if not self.is_t5:
            out = self.layers[index](hidden, mask)
            return out[0] if isinstance(out, tuple) else out  # type: ignore[no-any-return]
        if index > 0 and POSITION_BIAS not in extras:  # resuming a split task: the first layer ran elsewhere
            first: Any = self.layers[0]
            tokens = hidden.shape[1]
            extras[POSITION_BIAS] = first.layer[0].SelfAttention.compute_bias(tokens, tokens, hidden.device)
        hidden, position_bias, _ = self.layers[index](hidden, mask, extras.get(POSITION_BIAS))
        extras[POSITION_BIAS] = position_bias
        return hidden

    def finish(self, hidden: torch.Tensor) -> torch.Tensor:
        norm = getattr(self.module, "final_layer_norm" if self.is_t5 else "layer_norm", None)
        return hidden if norm is None else norm(hidden)


def encoder_stack(model: nn.Module) -> EncoderStack:
    transformers_model: Any = model  # what follows are transformers' attributes, not nn.Module's
    model_type = str(transformers_model.config.model_type)
    if model_type not in SUPPORTED_TYPES:
        raise UnsupportedModelError(
            f"model type {model_type!r} cannot be segmented as seq2seq; supported: {sorted(SUPPORTED_TYPES)}"
        )
    encoder = transformers_model.get_encoder()
    if model_type in _T5_TYPES:
        return EncoderStack(encoder, encoder.block, is_t5=True)
    return EncoderStack(encoder, encoder.layers, is_t5=False, positions_from_shape=_POSITIONS_FROM_SHAPE[model_type])


def decoder_layer_count(model: nn.Module) -> int:
    transformers_model: Any = model
    decoder = transformers_model.get_decoder()
    return len(decoder.block if hasattr(decoder, "block") else decoder.layers)


class EncoderSegment:
    """Encoder layers `layers`, with the embeddings in front (first segment) and the final norm
    behind (last segment)."""

    def __init__(self, stack: EncoderStack, layers: range, *, embed: bool, finish: bool) -> None:
        self.stack = stack
        self.layers = tuple(layers)
        self.embed = embed
        self.finish = finish
        parts = [("embed", embed), (f"layers{layers.start}-{layers.stop - 1}", bool(layers)), ("norm", finish)]
        self.name = "encoder:" + "+".join(part for part, present in parts if present)

    def __call__(self, state: SegmentState) -> SegmentState:
        with torch.inference_mode():
            hidden = self.stack.embed(state.input_ids) if self.embed and state.start <= EMBED else state.hidden
            if hidden is None:
                raise ValueError(f"segment {self.name} needs hidden states, but the batch has none")
            layers = [index for index in self.layers if FIRST_LAYER + index >= state.start]
            if layers:
                config = self.stack.module.config
                mask = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=state.mask)
                for index in layers:
                    hidden = self.stack.layer(index, hidden, mask, state.extras)
            if self.finish:
                hidden = self.stack.finish(hidden)
                state.extras.pop(POSITION_BIAS, None)  # the decoder has its own
            state.hidden = hidden
        return state


class DecodeSegment:
    """Decoding steps `part` of `parts` (each an equal share of max_new_tokens); the last one runs
    the search to its end and turns token ids into text."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        settings: DecodeSettings,
        limits: GenerationLimits,
        *,
        part: int,
        parts: int,
        layers: tuple[int, ...],
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.limits = limits
        self.part, self.parts = part, parts
        self.layers = layers
        self.name = "decode" if parts == 1 else f"decode{part + 1}/{parts}"

    @property
    def is_last(self) -> bool:
        return self.part == self.parts - 1

    def __call__(self, state: SegmentState) -> SegmentState:
        with torch.inference_mode():
            search: Search = state.extras.pop(SEARCH, None) or self._start(state)
            budget = math.ceil((self.part + 1) * (search.plan.max_length - 1) / self.parts)
            while not search.finished and (self.is_last or search.new_tokens < budget):
                search.step(self.model)
        if self.is_last:
            token_ids = search.token_ids()
            texts = self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
            state.outputs = [{"text": t, "token_ids": ids} for t, ids in zip(texts, token_ids, strict=True)]
        else:
            state.extras[SEARCH] = search
        return state

    def _start(self, state: SegmentState) -> Search:
        if state.hidden is None:
            raise ValueError(f"segment {self.name} needs the encoder's states, but the batch has none")
        params = parse_generation_params(state.params, self.limits)
        plan = self.settings.plan(params, state.input_ids)
        batch_size = state.input_ids.shape[0]
        inputs = DecoderInputs.start(self.model, state.hidden, state.mask, params.num_beams)
        if params.num_beams == 1:
            return GreedySearch(plan, inputs, batch_size)
        return BeamSearch(plan, inputs, batch_size)


def fit_limits(model: nn.Module, limits: GenerationLimits) -> GenerationLimits:
    """`limits` with max_new_tokens lowered to what the decoder's position table allows."""
    return limits.within_positions(DecodeSettings.from_model(model).max_target_positions)


def build_seq2seq_segments(
    model: nn.Module,
    tokenizer: Any,
    n_segments: Sequence[int] | int = 1,
    device: torch.device | None = None,
    spec: ModelSpec | None = None,
    *,
    decode_segments: int | None = None,
    limits: GenerationLimits | None = None,
) -> tuple[list[Segment], Seq2SeqTokenizer]:
    """The segments of `model` and the stage-0 tokenizer that feeds them.

    `n_segments` is the number of encoder segments (even split, capped at the encoder's layer
    count) or the encoder layer indices where segments 2..N start; `decode_segments` decode
    segments follow. `device`, when given, is where the model must already live. The registry
    entry `spec` supplies `max_tokens` and, from its options, `decode_segments` and the
    `GenerationLimits` fields; explicit arguments win. Encoder segments list encoder layer indices
    0..L-1 in `layers`; decode segments list the decoder's layers numbered after them (L..L+M-1).
    """
    options = spec.options if spec is not None else {}
    decode_segments = decode_segments if decode_segments is not None else options.get("decode_segments", 1)
    if isinstance(decode_segments, bool) or not isinstance(decode_segments, int) or decode_segments < 1:
        raise ValueError(f"decode_segments must be an integer of at least 1, not {decode_segments!r}")
    _check_device(model, device)
    model.eval()
    stack = encoder_stack(model)
    encoder = _encoder_segments(stack, n_segments)
    settings = DecodeSettings.from_model(model)
    fitted = fit_limits(model, limits or GenerationLimits.from_options(options))
    num_layers = len(stack.layers)
    decoder_layers = tuple(range(num_layers, num_layers + decoder_layer_count(model)))
    # Decoding runs on another stage thread than tokenisation; a fast tokenizer must not be used
    # from two threads at once, so the decode segments get their own copy.
    detokenizer = copy.deepcopy(tokenizer)
    decode = [
        DecodeSegment(model, detokenizer, settings, fitted, part=i, parts=decode_segments, layers=decoder_layers)
        for i in range(decode_segments)
    ]
    max_tokens = spec.max_tokens if spec is not None else settings.max_target_positions or 512
    return [*encoder, *decode], Seq2SeqTokenizer(tokenizer, max_tokens, fitted)


def _encoder_segments(stack: EncoderStack, n_segments: Sequence[int] | int) -> list[Segment]:
    num_layers = len(stack.layers)
    points = even_splits(num_layers, min(n_segments, num_layers)) if isinstance(n_segments, int) else list(n_segments)
    bounds = [0, *points, num_layers]
    if any(b <= a for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"split points {points} must increase strictly within 1..{num_layers - 1}")
    last = len(bounds) - 2
    return [
        EncoderSegment(stack, range(bounds[i], bounds[i + 1]), embed=i == 0, finish=i == last) for i in range(last + 1)
    ]


def _check_device(model: nn.Module, device: torch.device | None) -> None:
    if device is None:
        return
    found = next(model.parameters()).device
    if found.type != device.type or (device.index is not None and found.index != device.index):
        raise ValueError(f"the model is on {found}, not on {device} where its segments are to run")


class Seq2SeqTokenizer:
    """Stage 0 for `translate`/`generate`: rejects bad generation params before any model work,
    then tokenises as for an encoder (padded, truncated at `max_tokens`)."""

    def __init__(self, tokenizer: Any, max_tokens: int, limits: GenerationLimits | None = None) -> None:
        self.limits = limits or GenerationLimits()
        self.texts = EncoderTokenizer(tokenizer, max_tokens)

    def __call__(self, texts: list[str], params: dict[str, Any]) -> SegmentState:
        parse_generation_params(params, self.limits)
        state = self.texts(texts, params)
        state.extras.pop("token_type_ids", None)  # encoder-decoder models take none
        return state

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self.texts.count_tokens(texts)
