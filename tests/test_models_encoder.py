"""Encoder segments compute exactly what the unsplit model computes, and MiniLM's `embed` is
sentence-transformers' embedding."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, MPNetConfig, MPNetModel

from ectrans.bench.workload import load_sentences
from ectrans.common.registry import ModelSpec, build_spec, packaged_minilm_path
from ectrans.models.device import DeviceError, resolve_device
from ectrans.models.encoder import (
    EncoderTokenizer,
    Pooling,
    UnsupportedModelError,
    build_encoder_segments,
    embed_unsplit,
    encoder_parts,
    read_pooling,
)
from ectrans.models.loader import load_model
from ectrans.models.segments import SegmentState
from tests.tiny_encoders import LAYERS, MAKERS, MAX_TOKENS, SENTENCES, one_torch_thread

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encoders")
    return {kind: make(root / kind) for kind, make in MAKERS.items()}


def tiny_spec(path: Path, attn: str) -> ModelSpec:
    return build_spec(f"tiny-{path.name}", {"path": str(path), "attn_implementation": attn})


def run_segments(
    model: torch.nn.Module, splits: int | list[int], state: SegmentState, *, trace: bool = False
) -> SegmentState:
    with torch.inference_mode():
        segments = build_encoder_segments(model, splits, trace=trace)
        assert bool(segments[0].parts.calls) == trace  # traced layers hold on every supported family
        for segment in segments:
            state = segment(state)
    return state


@pytest.mark.parametrize("trace", [False, True], ids=["eager", "traced"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_segments_equal_unsplit_model(tiny_dirs: dict[str, Path], kind: str, attn: str, trace: bool) -> None:
    spec = tiny_spec(tiny_dirs[kind], attn)
    model = load_model(spec, CPU)
    assert cast(Any, model).config._attn_implementation == attn
    tokenize = EncoderTokenizer(AutoTokenizer.from_pretrained(spec.path, local_files_only=True), spec.max_tokens)
    with torch.inference_mode():
        reference = tokenize(SENTENCES, {})
        assert reference.mask.shape[1] == MAX_TOKENS and not bool(reference.mask.all())  # truncated and padded
        kwargs = {"input_ids": reference.input_ids, "attention_mask": reference.mask}
        expected_hidden = model(**kwargs).last_hidden_state
        expected = Pooling()(expected_hidden, reference.mask)
        # The check below must be able to fail: attending to padding changes the embeddings.
        unmasked = Pooling()(model(input_ids=reference.input_ids).last_hidden_state, reference.mask)
        assert (unmasked - expected).abs().max() > 1e-2
    for n in (2,) if trace else range(1, LAYERS + 1):  # a traced layer is the same at any split
        state = run_segments(model, n, tokenize(SENTENCES, {}), trace=trace)
        assert state.hidden is not None and state.outputs is not None
        assert (state.hidden - expected_hidden).abs().max() <= 1e-5, n
        assert (torch.stack(state.outputs) - expected).abs().max() <= 1e-5, n


@pytest.mark.parametrize("trace", [False, True], ids=["eager", "traced"])
def test_unpadded_batch_and_uneven_splits(tiny_dirs: dict[str, Path], trace: bool) -> None:
    """No padding: the 4-D mask is None for sdpa; uneven split points from a profile work too."""
    spec = tiny_spec(tiny_dirs["bert"], "sdpa")
    model = load_model(spec, CPU)
    tokenize = EncoderTokenizer(AutoTokenizer.from_pretrained(spec.path, local_files_only=True), spec.max_tokens)
    with torch.inference_mode():
        expected = embed_unsplit(model, tokenize(SENTENCES[:1], {}), Pooling())
    for splits in ([1], [3], [1, 2], [1, 3]):
        state = run_segments(model, splits, tokenize(SENTENCES[:1], {}), trace=trace)
        assert state.outputs is not None
        assert (torch.stack(state.outputs) - expected).abs().max() <= 1e-5


def test_segment_names_and_layers(tiny_dirs: dict[str, Path]) -> None:
    model = load_model(tiny_spec(tiny_dirs["distilbert"], "sdpa"), CPU)
    segments = build_encoder_segments(model, [1, 3])
    assert [s.name for s in segments] == ["embed+layers0-0", "layers1-2", "layers3-3+pool"]
    assert [s.layers for s in segments] == [(0,), (1, 2), (3,)]
    for bad in ([0], [2, 2], [3, 1], [4]):
        with pytest.raises(ValueError, match="split points"):
            build_encoder_segments(model, bad)
    with pytest.raises(ValueError, match="between 1 and"):
        build_encoder_segments(model, LAYERS + 1)


def test_unsupported_architecture_is_refused() -> None:
    config = MPNetConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    with pytest.raises(UnsupportedModelError, match="mpnet"):
        encoder_parts(MPNetModel(config))


def test_token_counts_mark_over_long_texts(tiny_dirs: dict[str, Path]) -> None:
    """Counts stop at the limit + 1, so a count over the limit means the text is too long (the worker
    refuses it unless truncation was asked for); the tokenised batch itself is cut at the limit."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["roberta"], local_files_only=True)
    tokenize = EncoderTokenizer(tokenizer, 16)
    counts = tokenize.count_tokens(SENTENCES)
    assert counts == [min(len(tokenizer(s)["input_ids"]), 17) for s in SENTENCES]
    assert counts[0] == 5  # <s> hello world . </s>
    assert max(counts) == 17  # one of the sentences is longer than 16 tokens
    state = tokenize(SENTENCES, {})
    assert state.mask.sum(dim=1).tolist() == [min(count, 16) for count in counts]


def test_token_limit_respects_the_position_table(tiny_dirs: dict[str, Path]) -> None:
    """RoBERTa's positions start after the padding index, so the registry's max_position_embeddings
    would overflow the table; the tokenizer's own limit wins, in the registry (where the worker
    refuses longer inputs) as in the tokenizer."""
    spec = tiny_spec(tiny_dirs["roberta"], "sdpa")
    assert spec.max_tokens == MAX_TOKENS
    model = load_model(spec, CPU)
    tokenizer = AutoTokenizer.from_pretrained(spec.path, local_files_only=True)
    state = run_segments(model, 2, EncoderTokenizer(tokenizer, spec.max_tokens)(SENTENCES, {}))
    assert state.input_ids.shape[1] == MAX_TOKENS


def test_pooling_read_from_sentence_transformers_files(tiny_dirs: dict[str, Path]) -> None:
    assert read_pooling(packaged_minilm_path()) == Pooling("mean", normalize=True)
    assert read_pooling(tiny_dirs["bert"]) == Pooling("mean", normalize=True)
    with pytest.raises(ValueError, match="mode"):
        Pooling("median")


def test_cuda_refused_clearly_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    assert resolve_device("auto") == CPU
    with pytest.raises(DeviceError, match="no CUDA"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="not supported"):
        resolve_device("mps")


@pytest.fixture(scope="module")
def minilm_texts() -> list[str]:
    texts = load_sentences("sentences_100.txt")[:12]
    return [*texts, " ".join(texts)]  # the last is far over 256 tokens: truncation must agree too


@pytest.mark.slow
def test_minilm_embed_equals_sentence_transformers(minilm_texts: list[str]) -> None:
    from sentence_transformers import SentenceTransformer

    path = packaged_minilm_path()
    expected = SentenceTransformer(str(path), device="cpu").encode(minilm_texts, normalize_embeddings=True)
    spec = build_spec("minilm", {"path": str(path)})
    assert spec.max_tokens == 256
    model = load_model(spec, CPU)
    tokenize = EncoderTokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True), spec.max_tokens)
    pooling = read_pooling(path)
    assert encoder_parts(model).num_layers == 6
    for n in (1, 2, 6):  # every count is checked against the unsplit model on the tiny encoders
        with torch.inference_mode():
            state = tokenize(minilm_texts, {})
            for segment in build_encoder_segments(model, n, pooling):
                state = segment(state)
        assert state.outputs is not None
        got = torch.stack(state.outputs).numpy()
        assert got.dtype == np.float32
        assert np.abs(got - expected).max() <= 1e-5, n


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_counted_texts_are_padded_as_the_tokenizer_pads_them(tiny_dirs: dict[str, Path], kind: str, side: str) -> None:
    """Stage 0 reuses the ids `count_tokens` made; the batch must be exactly the tokenizer's own."""
    path = tiny_dirs[kind]
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = side
    tokenize = EncoderTokenizer(tokenizer, 12)
    texts = [s for s in SENTENCES if tokenize.count_tokens([s])[0] <= tokenize.max_tokens]
    texts = list(dict.fromkeys(texts))[:4]
    assert len({len(ids) for ids in tokenizer(texts)["input_ids"]}) > 1  # rows of different lengths: padding
    expected = tokenizer(texts, padding=True, truncation=True, max_length=12, return_tensors="pt")
    tokenize.count_tokens(texts)
    assert all(text in tokenize._counted for text in texts)
    state = tokenize(texts, {})
    assert not any(text in tokenize._counted for text in texts)  # taken for this batch
    assert torch.equal(state.input_ids, expected["input_ids"]) and torch.equal(state.mask, expected["attention_mask"])
    if "token_type_ids" in expected:
        assert torch.equal(state.extras["token_type_ids"], expected["token_type_ids"])
    else:
        assert "token_type_ids" not in state.extras
    again = tokenize(texts, {})  # not counted this time: tokenised, the same
    assert torch.equal(again.input_ids, state.input_ids) and torch.equal(again.mask, state.mask)


def test_the_counted_ids_cache_stays_small(tiny_dirs: dict[str, Path]) -> None:
    """Texts that never reach a batch, texts twice in one batch, and long texts of few tokens (spaces)
    cannot grow the cache past its bound."""
    from ectrans.models import encoder

    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["bert"], local_files_only=True)
    tokenize = EncoderTokenizer(tokenizer, 12)
    spaces = "a" + " " * (encoder.COUNTED_CHARS_PER_TOKEN * 12)  # two tokens, many characters
    tokenize.count_tokens([spaces, "the cat"])
    assert list(tokenize._counted) == ["the cat"]
    state = tokenize(["the cat", "the cat"], {})  # twice in one batch: tokenised, and gone from the cache
    assert not tokenize._counted and state.input_ids.shape[0] == 2
    tokenize.count_tokens([f"word {i}" for i in range(encoder.COUNTED_KEPT + 50)])
    assert len(tokenize._counted) == encoder.COUNTED_KEPT


def test_the_counted_ids_cache_is_bounded_in_characters_too(
    tiny_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ectrans.models import encoder

    monkeypatch.setattr(encoder, "COUNTED_CHARS", 100)
    tokenize = EncoderTokenizer(AutoTokenizer.from_pretrained(tiny_dirs["bert"], local_files_only=True), 12)
    texts = [f"the cat {i:02d}" for i in range(30)]  # 10 characters each
    tokenize.count_tokens(texts)
    assert list(tokenize._counted) == texts[-10:] and tokenize._counted_chars == 100
    tokenize(texts[-10:], {})
    assert not tokenize._counted and tokenize._counted_chars == 0
    tokenize.keeps_counted = False  # a counter for executor processes, which tokenise themselves
    tokenize.count_tokens(texts)
    assert not tokenize._counted
