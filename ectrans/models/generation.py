"""Generation for encoder-decoder models: the model's generation settings, the per-batch search
plan, and greedy search over a KV cache (beam search is in `beam_search`).

The searches here reproduce `model.generate(..., do_sample=False)` token for token: the same
decoder calls (one new token per step over transformers' `EncoderDecoderCache`), the same logits
processors built from the model's `generation_config`, the same stopping rules. Unlike `generate`,
they keep all their state in one object and advance a step at a time, so a batch can stop between
steps, be parked, and resume (see `seq2seq.DecodeSegment`).

Output convention: for each input, the generated token ids without the decoder start token, up to
and including the first end-of-sequence token (without the padding `generate` appends to align a
batch); `max_new_tokens` ids when no end-of-sequence token came.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.generation.logits_process import (
    EncoderNoRepeatNGramLogitsProcessor,
    EncoderRepetitionPenaltyLogitsProcessor,
    ExponentialDecayLengthPenalty,
    ForcedBOSTokenLogitsProcessor,
    ForcedEOSTokenLogitsProcessor,
    InfNanRemoveLogitsProcessor,
    LogitNormalization,
    LogitsProcessor,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
)
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList
from transformers.modeling_outputs import BaseModelOutput

from ectrans.models.generation_params import GenerationParams

# Generation settings that change which tokens come out and that these searches do not implement.
_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "guidance_scale": lambda v: v is not None and v != 1,
    "constraints": lambda v: v is not None,
    "force_words_ids": lambda v: v is not None,
    "num_beam_groups": lambda v: v is not None and v > 1,
    "penalty_alpha": lambda v: v is not None and v > 0,
    "watermarking_config": lambda v: v is not None,
    "stop_strings": lambda v: v is not None,
    "max_time": lambda v: v is not None,
    "num_return_sequences": lambda v: v is not None and v > 1,
}


class UnsupportedGenerationError(ValueError):
    """The model's generation config asks for something these searches cannot reproduce."""


@dataclass(frozen=True)
class DecodeSettings:
    """A model's generation config, resolved once: special tokens as ids, settings that change the
    chosen tokens turned into logits processors. Search is always deterministic (sampling settings
    are ignored) and always uses a dynamic KV cache, whatever `use_cache`/`cache_implementation` say."""

    config: GenerationConfig
    start_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    max_target_positions: int | None  # the decoder's position limit, if it has one

    @classmethod
    def from_model(cls, model: Any) -> DecodeSettings:
        config = copy.deepcopy(model.generation_config)
        for key, unsupported in _UNSUPPORTED.items():
            if unsupported(getattr(config, key, None)):
                raise UnsupportedGenerationError(f"generation setting {key}={getattr(config, key)!r} is not supported")
        start = config.decoder_start_token_id
        if start is None:
            start = config.bos_token_id
        eos = config.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, list | tuple) else () if eos is None else (eos,)
        if not isinstance(start, int) or not eos_ids:
            raise UnsupportedGenerationError("generation needs a decoder start token and an end-of-sequence token")
        pad = config.pad_token_id if config.pad_token_id is not None else eos_ids[0]
        positions = getattr(model.config, "max_position_embeddings", None)
        return cls(config, start, eos_ids, pad, positions if isinstance(positions, int) else None)

    def check(self, params: GenerationParams) -> None:
        # The start token takes a position too; learned or sinusoidal tables end at the limit.
        if self.max_target_positions is not None and params.max_new_tokens >= self.max_target_positions:
            raise ValueError(
                f"max_new_tokens must be below the decoder's {self.max_target_positions} positions, "
                f"not {params.max_new_tokens}"
            )

    def setting(self, key: str, default: Any) -> Any:
        value = getattr(self.config, key, None)
        return default if value is None else value

    def plan(self, params: GenerationParams, encoder_input_ids: torch.Tensor) -> SearchPlan:
        self.check(params)
        device = encoder_input_ids.device
        eos = torch.tensor(self.eos_token_ids, device=device)
        max_length = 1 + params.max_new_tokens  # the decoder start token counts, as in `generate`
        stopping = StoppingCriteriaList([MaxLengthCriteria(max_length), EosTokenCriteria(eos)])
        return SearchPlan(
            num_beams=params.num_beams,
            max_length=max_length,
            start_token_id=self.start_token_id,
            pad_token_id=self.pad_token_id,
            eos=eos,
            length_penalty=float(self.setting("length_penalty", 1.0)),
            early_stopping=self.setting("early_stopping", False),
            processors=self._processors(max_length, eos, encoder_input_ids),
            stopping=stopping,
        )

    def _processors(self, max_length: int, eos: torch.Tensor, encoder_ids: torch.Tensor) -> LogitsProcessorList:
        """The logits processors `generate` builds for deterministic search, in its order."""
        device = str(encoder_ids.device)
        found: list[LogitsProcessor] = []
        if (bias := self.setting("sequence_bias", None)) is not None:
            found.append(SequenceBiasLogitsProcessor(sequence_bias=bias))
        if (penalty := self.setting("encoder_repetition_penalty", 1.0)) != 1.0:
            found.append(
                EncoderRepetitionPenaltyLogitsProcessor(penalty=penalty, encoder_input_ids=as_ids(encoder_ids))
            )
        if (penalty := self.setting("repetition_penalty", 1.0)) != 1.0:
            found.append(RepetitionPenaltyLogitsProcessor(penalty))
        if (size := self.setting("no_repeat_ngram_size", 0)) > 0:
            found.append(NoRepeatNGramLogitsProcessor(size))
        if (size := self.setting("encoder_no_repeat_ngram_size", 0)) > 0:
            found.append(EncoderNoRepeatNGramLogitsProcessor(size, as_ids(encoder_ids)))
        if (bad_words := self.setting("bad_words_ids", None)) is not None:
            found.append(NoBadWordsLogitsProcessor(bad_words, eos))
        min_new_tokens = self.setting("min_new_tokens", 0)
        min_length = self.setting("min_length", 0)
        if self.config.min_new_tokens is not None:  # `generate` then overrides min_length (start token + new)
            min_length = 1 + min_new_tokens
        if min_length > 0:
            found.append(MinLengthLogitsProcessor(min_length, eos, device=device))
        if min_new_tokens > 0:
            found.append(MinNewTokensLengthLogitsProcessor(1, min_new_tokens, eos, device=device))
        if (forced_bos := self.setting("forced_bos_token_id", None)) is not None:
            found.append(ForcedBOSTokenLogitsProcessor(forced_bos))
        if (forced_eos := self.setting("forced_eos_token_id", None)) is not None:
            found.append(ForcedEOSTokenLogitsProcessor(max_length, forced_eos, device=device))
        if self.setting("remove_invalid_values", False):
            found.append(InfNanRemoveLogitsProcessor())
        if (decay := self.setting("exponential_decay_length_penalty", None)) is not None:
            found.append(ExponentialDecayLengthPenalty(decay, eos, 1))
        if (suppress := self.setting("suppress_tokens", None)) is not None:
            found.append(SuppressTokensLogitsProcessor(suppress, device=device))
        if (begin_suppress := self.setting("begin_suppress_tokens", None)) is not None:
            begin_index = 1 if forced_bos is None else 2
            found.append(SuppressTokensAtBeginLogitsProcessor(begin_suppress, begin_index, device=device))
        if self.setting("renormalize_logits", False):
            found.append(LogitNormalization())
        return LogitsProcessorList(found)


@dataclass(frozen=True)
class SearchPlan:
    """Everything one batch's search needs besides the model (built per batch: some processors
    hold that batch's encoder input ids)."""

    num_beams: int
    max_length: int  # decoder start token + max_new_tokens
    start_token_id: int
    pad_token_id: int
    eos: torch.Tensor  # 1-D, on the model's device
    length_penalty: float
    early_stopping: bool | str
    processors: LogitsProcessorList
    stopping: StoppingCriteriaList


class DecoderModel(Protocol):
    """What the searches need of a `*ForConditionalGeneration` model."""

    config: Any

    def __call__(self, **kwargs: Any) -> Any: ...


@functools.cache
def _cache_argument(model_class: type[torch.nn.Module]) -> str:
    """The KV cache's keyword: `cache` since transformers 5.25, where `past_key_values` is deprecated."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


@dataclass
class DecoderInputs:
    """The per-batch inputs of every decoder step, one row per hypothesis."""

    encoder_outputs: BaseModelOutput
    encoder_mask: torch.Tensor
    cache: EncoderDecoderCache

    @classmethod
    def start(cls, model: DecoderModel, hidden: torch.Tensor, mask: torch.Tensor, rows: int) -> DecoderInputs:
        """Encoder states repeated for `rows` hypotheses per input, and an empty cache, as `generate` makes them."""
        if rows > 1:
            hidden, mask = hidden.repeat_interleave(rows, dim=0), mask.repeat_interleave(rows, dim=0)
        decoder_config = model.config.get_text_config(decoder=True)
        cache = EncoderDecoderCache(DynamicCache(config=decoder_config), DynamicCache(config=decoder_config))
        return cls(BaseModelOutput(last_hidden_state=hidden), mask, cache)

    def next_token_logits(self, model: DecoderModel, last_tokens: torch.Tensor) -> torch.Tensor:
        """Run the decoder on one new token per row; float32 logits for the next token."""
        outputs = model(
            decoder_input_ids=last_tokens,
            encoder_outputs=self.encoder_outputs,
            attention_mask=self.encoder_mask,
            use_cache=True,
            return_dict=True,
            **{_cache_argument(type(model)): self.cache},
        )
        return outputs.logits[:, -1].to(copy=True, dtype=torch.float32)  # type: ignore[no-any-return]

    def tensors(self) -> list[torch.Tensor]:
        found = [self.encoder_outputs.last_hidden_state, self.encoder_mask]
        for cache in (self.cache.self_attention_cache, self.cache.cross_attention_cache):
            for layer in cache.layers:
                found += [getattr(layer, name) for name in ("keys", "values") if hasattr(layer, name)]
        return [t for t in found if isinstance(t, torch.Tensor)]


class Search(Protocol):
    """One batch's generation in progress; all of its state lives in the object."""

    plan: SearchPlan
    finished: bool

    @property
    def new_tokens(self) -> int:
        """Tokens generated so far (decoding steps taken)."""
        ...

    def step(self, model: DecoderModel) -> None: ...

    def token_ids(self) -> list[list[int]]:
        """Per input, the generated ids (see the module docstring)."""
        ...

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the search holds (for memory accounting and stream bookkeeping)."""
        ...


class GreedySearch:
    """`generate`'s greedy search (`_sample` with do_sample=False), one step per `step`."""

    def __init__(self, plan: SearchPlan, inputs: DecoderInputs, batch_size: int) -> None:
        self.plan = plan
        self.inputs = inputs
        device = inputs.encoder_mask.device
        self.sequences = torch.full((batch_size, 1), plan.start_token_id, dtype=torch.long, device=device)
        self.unfinished = torch.ones(batch_size, dtype=torch.long, device=device)
        self.finished = False

    @property
    def new_tokens(self) -> int:
        return self.sequences.shape[1] - 1

    def step(self, model: DecoderModel) -> None:
        logits = self.inputs.next_token_logits(model, self.sequences[:, -1:])
        scores = self.plan.processors(as_ids(self.sequences), logits)
        tokens = torch.argmax(scores, dim=-1)
        # Rows that already ended get padding, as in `generate`.
        tokens = tokens * self.unfinished + self.plan.pad_token_id * (1 - self.unfinished)
        self.sequences = torch.cat([self.sequences, tokens[:, None]], dim=-1)
        self.unfinished = self.unfinished & ~self.plan.stopping(self.sequences, None)
        self.finished = bool(self.unfinished.max() == 0)

    def token_ids(self) -> list[list[int]]:
        return [until_eos(row, self.plan.eos) for row in self.sequences[:, 1:].tolist()]

    def tensors(self) -> list[torch.Tensor]:
        return [self.sequences, self.unfinished, *self.inputs.tensors()]


def as_ids(tensor: torch.Tensor) -> torch.LongTensor:
    """transformers annotates token ids as `torch.LongTensor`, a type torch's operations never return."""
    return cast(torch.LongTensor, tensor)


def until_eos(ids: list[int], eos: torch.Tensor) -> list[int]:
    """`ids` cut after the first end-of-sequence token (what follows it is padding)."""
    stops = set(eos.tolist())
    for position, token in enumerate(ids):
        if token in stops:
            return ids[: position + 1]
    return ids
