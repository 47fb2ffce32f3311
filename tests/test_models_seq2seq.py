"""Encoder-decoder models as segments: encoder states equal the unsplit encoder's, generated tokens
equal `model.generate`'s (greedy and beam, padded batches), through bare segments, the pipeline
and the loader."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, BertConfig, BertModel

from ectrans.common.registry import ModelSpec, build_spec
from ectrans.models.api import Request
from ectrans.models.encoder import UnsupportedModelError
from ectrans.models.generation import UnsupportedGenerationError
from ectrans.models.generation_params import GenerationLimits, GenerationParams, parse_generation_params
from ectrans.models.loader import load_executor
from ectrans.models.pipeline import PipelinedExecutor
from ectrans.models.segments import Segment, SegmentState
from ectrans.models.seq2seq import SEARCH, build_seq2seq_segments, fit_limits
from tests.tiny_seq2seq import MAKERS, SENTENCES

FULL_MATRIX = ("marian", "bart", "t5")  # every segment count, greedy and beam
ALSO_SUPPORTED = ("mbart", "pegasus", "mt5")
MAX_NEW = 16
ENCODER_LAYERS = {"marian": 4, "bart": 4, "t5": 4, "mbart": 2, "pegasus": 2, "mt5": 2}


@dataclass
class Tiny:
    """A saved tiny model, loaded once, with `generate`'s answers memoised per setting."""

    path: Path
    model: Any
    tokenizer: Any
    _references: dict[tuple[int, int], list[list[int]]] = field(default_factory=dict)

    @property
    def eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        return set(eos) if isinstance(eos, list) else {eos}

    def reference(self, num_beams: int, max_new_tokens: int = MAX_NEW) -> list[list[int]]:
        """`generate`'s ids for SENTENCES without the start token, cut after the first eos."""
        key = (num_beams, max_new_tokens)
        if key not in self._references:
            self._references[key] = generate_ids(self, SENTENCES, num_beams, max_new_tokens)
        return self._references[key]


def generate_ids(tiny: Tiny, texts: list[str], num_beams: int, max_new_tokens: int = MAX_NEW) -> list[list[int]]:
    batch = tiny.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        out = tiny.model.generate(**batch, num_beams=num_beams, max_new_tokens=max_new_tokens, do_sample=False)
    return [cut_after_eos(row[1:], tiny.eos_ids) for row in out.tolist()]


def cut_after_eos(ids: list[int], eos: set[int]) -> list[int]:
    ends = [position for position, token in enumerate(ids) if token in eos]
    return ids[: ends[0] + 1] if ends else ids


def run(segments: list[Segment], state: SegmentState) -> SegmentState:
    for segment in segments:
        state = segment(state)
    return state


def translate(tiny: Tiny, n_segments: int | list[int], params: dict[str, Any], **options: Any) -> list[Any]:
    segments, tokenize = build_seq2seq_segments(tiny.model, tiny.tokenizer, n_segments, **options)
    outputs = run(segments, tokenize(SENTENCES, params)).outputs
    assert outputs is not None
    return outputs


@pytest.fixture(scope="module", autouse=True)
def one_intra_op_thread() -> Iterator[None]:
    """Models this small gain nothing from intra-op threads, and on a busy two-core host OpenMP's
    waiting threads make every op an order of magnitude slower (measured: 4.8 s against 0.14 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Tiny]]:
    loaded: dict[str, Tiny] = {}

    def get(family: str) -> Tiny:
        if family not in loaded:
            path = MAKERS[family](tmp_path_factory.mktemp(family))
            model = AutoModelForSeq2SeqLM.from_pretrained(path).eval()
            loaded[family] = Tiny(path, model, AutoTokenizer.from_pretrained(path))
        return loaded[family]

    yield get


@pytest.mark.parametrize("family", [*FULL_MATRIX, *ALSO_SUPPORTED])
def test_saved_directory_is_a_seq2seq_model(tiny: Callable[[str], Tiny], family: str) -> None:
    model = tiny(family)
    spec = build_spec(f"tiny-{family}", {"path": str(model.path)})
    assert spec.kind == "seq2seq"
    assert spec.model_type == family
    assert {"translate", "generate"} <= spec.ops
    ids = model.tokenizer("Hello world .")["input_ids"]
    assert model.tokenizer.decode(ids, skip_special_tokens=True) == "hello world."  # spaces before punctuation cleaned


def encoder_cases() -> list[tuple[str, int | list[int]]]:
    cases: list[tuple[str, int | list[int]]] = []
    for family in FULL_MATRIX:
        cases += [(family, n) for n in range(1, ENCODER_LAYERS[family] + 1)] + [(family, [1, 3])]
    return cases + [(family, 2) for family in ALSO_SUPPORTED]


@pytest.mark.parametrize(("family", "splits"), encoder_cases())
def test_encoder_states_equal_unsplit(tiny: Callable[[str], Tiny], family: str, splits: int | list[int]) -> None:
    model = tiny(family)
    segments, tokenize = build_seq2seq_segments(model.model, model.tokenizer, splits)
    encoder = segments[:-1]
    assert len(encoder) == (splits if isinstance(splits, int) else len(splits) + 1)
    state = run(encoder, tokenize(SENTENCES, {}))
    assert state.mask.min() == 0, "the batch must carry padding"
    with torch.inference_mode():
        expected = model.model.get_encoder()(input_ids=state.input_ids, attention_mask=state.mask).last_hidden_state
    assert state.hidden is not None
    assert (state.hidden - expected).abs().max().item() <= 1e-5
    assert "position_bias" not in state.extras  # T5's bias stays inside the encoder


@pytest.mark.parametrize("family", FULL_MATRIX)
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("n_segments", [1, 2, 4])
def test_tokens_equal_generate(tiny: Callable[[str], Tiny], family: str, num_beams: int, n_segments: int) -> None:
    model = tiny(family)
    outputs = translate(model, n_segments, {"num_beams": num_beams, "max_new_tokens": MAX_NEW})
    expected = model.reference(num_beams)
    assert [output["token_ids"] for output in outputs] == expected
    texts = model.tokenizer.batch_decode(expected, skip_special_tokens=True)
    assert [output["text"] for output in outputs] == texts


@pytest.mark.parametrize("family", ALSO_SUPPORTED)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_other_families_equal_generate(tiny: Callable[[str], Tiny], family: str, num_beams: int) -> None:
    model = tiny(family)
    outputs = translate(model, 2, {"num_beams": num_beams, "max_new_tokens": MAX_NEW})
    assert [output["token_ids"] for output in outputs] == model.reference(num_beams)


@pytest.mark.parametrize("family", ["marian", "t5"])
@pytest.mark.parametrize(
    "load_options", [{"attn_implementation": "eager"}, {"dtype": torch.bfloat16}], ids=["eager", "bf16"]
)
def test_other_attention_and_dtypes_equal_generate(
    tiny: Callable[[str], Tiny], family: str, load_options: dict[str, Any]
) -> None:
    """The registry's `attn_implementation` option (an additive float mask instead of sdpa's bool
    one) and a half-precision dtype change the arithmetic, not the agreement."""
    base = tiny(family)
    model = Tiny(base.path, AutoModelForSeq2SeqLM.from_pretrained(base.path, **load_options).eval(), base.tokenizer)
    outputs = translate(model, 2, {"num_beams": 3, "max_new_tokens": MAX_NEW})
    assert [output["token_ids"] for output in outputs] == generate_ids(model, SENTENCES, num_beams=3)


@pytest.mark.parametrize("family", FULL_MATRIX)
def test_references_end_early_and_at_the_cap(tiny: Callable[[str], Tiny], family: str) -> None:
    """Guards the comparisons above from being vacuous: the tiny models stop on eos for some
    inputs and run to max_new_tokens for others."""
    model = tiny(family)
    lengths = [len(ids) for beams in (1, 3) for ids in model.reference(beams)]
    assert min(lengths) < MAX_NEW
    assert max(lengths) == MAX_NEW
    assert len({tuple(ids) for ids in model.reference(1)}) > 1, "outputs must depend on the input"


# Changes to the tiny BART's generation config (bart-large-cnn's: early stopping, length penalty 2,
# n-gram blocking, forced bos/eos, minimum length), each checked against `generate` with it.
GENERATION_VARIANTS = {
    "no-early-stop": {"early_stopping": False, "length_penalty": 1.0},
    "never-stop-long": {"early_stopping": "never", "length_penalty": 1.5},
    "never-stop-short": {"early_stopping": "never", "length_penalty": -0.5},
    "penalties": {
        "repetition_penalty": 1.3,
        "min_new_tokens": 4,
        "suppress_tokens": [5, 6],
        "begin_suppress_tokens": [7],
    },
    "encoder-ngrams": {
        "encoder_no_repeat_ngram_size": 2,
        "exponential_decay_length_penalty": (4, 1.5),
        "renormalize_logits": True,
    },
    "biases": {"sequence_bias": {(8,): -2.0, (9, 10): 1.0}, "encoder_repetition_penalty": 1.5},
}


@pytest.mark.parametrize("settings", GENERATION_VARIANTS.values(), ids=GENERATION_VARIANTS.keys())
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_config_settings_are_honoured(
    tiny: Callable[[str], Tiny], settings: dict[str, Any], num_beams: int
) -> None:
    base = tiny("bart")
    model = Tiny(base.path, AutoModelForSeq2SeqLM.from_pretrained(base.path).eval(), base.tokenizer)
    for key, value in settings.items():
        setattr(model.model.generation_config, key, value)
    outputs = translate(model, 2, {"num_beams": num_beams, "max_new_tokens": MAX_NEW})
    assert [output["token_ids"] for output in outputs] == generate_ids(model, SENTENCES, num_beams)


def test_decoding_parks_between_decode_segments(tiny: Callable[[str], Tiny]) -> None:
    """Two batches advance alternately through three decode segments: each keeps its whole search
    in its own state, so interleaving changes nothing."""
    model = tiny("bart")
    segments, tokenize = build_seq2seq_segments(model.model, model.tokenizer, 2, decode_segments=3)
    assert [segment.name for segment in segments[-3:]] == ["decode1/3", "decode2/3", "decode3/3"]
    beam = tokenize(SENTENCES, {"num_beams": 3, "max_new_tokens": MAX_NEW})
    greedy = tokenize(SENTENCES, {"max_new_tokens": MAX_NEW})
    beam, greedy = run(segments[:-2], beam), run(segments[:-2], greedy)
    assert beam.outputs is None
    parked = beam.extras[SEARCH]
    assert parked.new_tokens == math.ceil(MAX_NEW / 3)
    decoder_layers = len(segments[-1].layers)
    assert len(parked.tensors()) >= 4 * decoder_layers, "self- and cross-attention keys and values per layer"
    greedy = run(segments[-2:], greedy)
    beam = run(segments[-2:], beam)
    assert SEARCH not in beam.extras and SEARCH not in greedy.extras
    assert beam.outputs is not None and greedy.outputs is not None
    assert [output["token_ids"] for output in beam.outputs] == model.reference(3)
    assert [output["token_ids"] for output in greedy.outputs] == model.reference(1)


def test_request_params_are_checked() -> None:
    limits = GenerationLimits(default_num_beams=2, max_num_beams=4, default_max_new_tokens=8, max_new_tokens=32)
    assert parse_generation_params({}, limits) == GenerationParams(num_beams=2, max_new_tokens=8)
    assert parse_generation_params({"num_beams": "4", "max_new_tokens": 32, "other": 1}, limits) == GenerationParams(
        num_beams=4, max_new_tokens=32
    )
    for bad in ({"num_beams": 0}, {"num_beams": 5}, {"num_beams": True}, {"max_new_tokens": "x"}, {"num_beams": 2.0}):
        with pytest.raises(ValueError, match="must be an integer from 1 to"):
            parse_generation_params(bad, limits)
    with pytest.raises(ValueError, match="default_num_beams"):
        GenerationLimits(default_num_beams=9)
    with pytest.raises(ValueError, match="must be an integer"):
        GenerationLimits.from_options({"max_new_tokens": "many"})
    assert GenerationLimits.from_options({"max_new_tokens": 100, "path": "x"}).max_new_tokens == 100


def test_a_cap_below_the_default_lowers_the_default_it_does_not_refuse_the_model() -> None:
    """`max_new_tokens = 40` alone in a models file: the model serves 40 by default (it failed to load
    because the unasked default, 64, was over it); a default asked over its cap is still an error."""
    assert GenerationLimits.from_options({"max_new_tokens": 40}) == GenerationLimits(
        default_max_new_tokens=40, max_new_tokens=40
    )
    assert GenerationLimits.from_options({"max_new_tokens": 100}).default_max_new_tokens == 64
    with pytest.raises(ValueError, match="default_max_new_tokens"):
        GenerationLimits.from_options({"max_new_tokens": 40, "default_max_new_tokens": 50})


def test_max_new_tokens_stays_inside_the_position_table(tiny: Callable[[str], Tiny]) -> None:
    model = tiny("marian")  # 128 positions
    fitted = fit_limits(model.model, GenerationLimits(default_max_new_tokens=200, max_new_tokens=500))
    assert (fitted.default_max_new_tokens, fitted.max_new_tokens) == (127, 127)
    _, tokenize = build_seq2seq_segments(model.model, model.tokenizer, 1, limits=GenerationLimits(max_new_tokens=500))
    assert tokenize(["hello"], {"max_new_tokens": 127}).input_ids.shape[0] == 1
    with pytest.raises(ValueError, match="max_new_tokens must be an integer from 1 to 127"):
        tokenize(["hello"], {"max_new_tokens": 128})


def test_unsupported_models_and_settings_are_refused(tiny: Callable[[str], Tiny]) -> None:
    bert = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    with pytest.raises(UnsupportedModelError, match="bert"):
        build_seq2seq_segments(bert, None, 1)
    base = tiny("marian")
    model = AutoModelForSeq2SeqLM.from_pretrained(base.path)
    model.generation_config.num_beam_groups = 2
    with pytest.raises(UnsupportedGenerationError, match="num_beam_groups"):
        build_seq2seq_segments(model, base.tokenizer, 1)


def pipeline_for(model: Tiny, spec: ModelSpec) -> PipelinedExecutor:
    segments, tokenize = build_seq2seq_segments(model.model, model.tokenizer, 2, spec=spec)
    return PipelinedExecutor(spec, segments, tokenize, threads=1)


def test_pipeline_translates_and_reports_bad_inputs_per_item(tiny: Callable[[str], Tiny]) -> None:
    model = tiny("marian")
    spec = build_spec("tiny-marian", {"path": str(model.path)})
    executor = pipeline_for(model, spec)
    try:
        inputs = [SENTENCES[0], "", SENTENCES[1], "   ", SENTENCES[4]]
        params = {"num_beams": "3", "max_new_tokens": MAX_NEW}
        translated = executor.submit(Request("translate", inputs, params)).result(timeout=60)[0]
        generated = executor.submit(Request("generate", inputs[:1], {})).result(timeout=60)[0]
        refused = executor.submit(Request("translate", inputs[:2], {"num_beams": 99})).result(timeout=60)[0]
    finally:
        executor.close()
    kept = [SENTENCES[0], SENTENCES[1], SENTENCES[4]]
    expected = generate_ids(model, kept, num_beams=3)
    assert [result.error for result in translated] == [None, "empty input", None, "empty input", None]
    assert [translated[i].output["token_ids"] for i in (0, 2, 4)] == expected
    texts = model.tokenizer.batch_decode(expected, skip_special_tokens=True)
    assert [translated[i].output["text"] for i in (0, 2, 4)] == texts
    # Defaults: greedy, 64 new tokens.
    assert generated[0].output["token_ids"] == generate_ids(model, kept[:1], num_beams=1, max_new_tokens=64)[0]
    assert refused[0].error is not None and "num_beams must be an integer from 1 to 8" in refused[0].error
    assert refused[1].error == "empty input"


def test_loader_serves_translate_like_generate(tiny: Callable[[str], Tiny]) -> None:
    model = tiny("marian")
    spec = build_spec("tiny-marian", {"path": str(model.path), "decode_segments": 2, "max_num_beams": 4})
    executor = load_executor(spec, device="cpu", threads=1, segments=2)
    try:
        assert isinstance(executor, PipelinedExecutor)
        names = [segment.name for segment in executor.segments]
        results, stats = executor.submit(Request("translate", SENTENCES, {"num_beams": 2})).result(timeout=60)
        refused = executor.submit(Request("translate", SENTENCES[:1], {"num_beams": 5})).result(timeout=60)[0]
    finally:
        executor.close()
    assert names == ["encoder:embed+layers0-1", "encoder:layers2-3+norm", "decode1/2", "decode2/2"]
    assert [result.output["token_ids"] for result in results] == generate_ids(model, SENTENCES, 2, 64)
    assert stats.batch_size == len(SENTENCES)
    assert refused[0].error is not None and "from 1 to 4" in refused[0].error
