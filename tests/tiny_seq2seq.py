"""Random-weight encoder-decoder models built in code, saved with a tokenizer built in code.

Each `make_*` function writes a Hugging Face model directory (config, generation config, weights,
tokenizer) that `AutoModelForSeq2SeqLM.from_pretrained` and `AutoTokenizer.from_pretrained` load
offline, and that `common.registry.build_spec` classifies as kind "seq2seq". The tokenizers are
word-level over a small English vocabulary, so no sentencepiece model is needed. The vocabulary
and the tokenizer come from `ectrans.models.synthetic`, which also builds the benchmark-sized
models (the prototype-sized Marian, a T5-large shape).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    MarianConfig,
    MarianMTModel,
    MBartConfig,
    MBartForConditionalGeneration,
    MT5Config,
    MT5ForConditionalGeneration,
    PegasusConfig,
    PegasusForConditionalGeneration,
    PreTrainedModel,
    T5Config,
    T5ForConditionalGeneration,
)

from ectrans.models.synthetic import (
    BART_SPECIALS,
    MARIAN_SPECIALS,
    T5_SPECIALS,
    generation_config,
    word_level_tokenizer,
)
from ectrans.models.synthetic import save as _save
from ectrans.models.synthetic import vocabulary as _vocabulary

# Sentences for tests: different lengths, so batches carry padding.
SENTENCES = [
    "hello world .",
    "the cat saw a dog in the house , and the dog ran to the river .",
    "we read a good book",
    "thanks !",
    "my old car is slow but it goes , it goes every day to the city and back .",
]

TINY_WIDTH = {"d_model": 32, "heads": 4, "ffn": 64, "positions": 128}


def spread_weights(model: PreTrainedModel, seed: int, eos_boost: float = 0.0) -> PreTrainedModel:
    """Weights whose outputs depend on the input: the default initialisation (std 0.02) is so small
    at this width that every input yields the same tokens, which would make comparisons vacuous.

    `eos_boost` makes end-of-sequence likely enough that some outputs end before max_new_tokens
    and some do not, so tests see both (random weights almost never choose it otherwise).
    """
    torch.manual_seed(seed)
    parts: Any = model  # family-specific attributes
    eos = model.config.eos_token_id
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, parameter.shape[-1] ** -0.5)
        if eos_boost and hasattr(model, "final_logits_bias"):  # BART family: a bias on the logits
            parts.final_logits_bias[0, eos] = eos_boost
        elif eos_boost:  # T5 has no logits bias: lengthen the output embedding of eos instead
            parts.get_output_embeddings().weight[eos] *= eos_boost
    model.train(False)
    return model


def _bart_family_sizes(layers: tuple[int, int]) -> dict[str, Any]:
    width = TINY_WIDTH
    return {
        "d_model": width["d_model"],
        "encoder_layers": layers[0],
        "decoder_layers": layers[1],
        "encoder_attention_heads": width["heads"],
        "decoder_attention_heads": width["heads"],
        "encoder_ffn_dim": width["ffn"],
        "decoder_ffn_dim": width["ffn"],
        "max_position_embeddings": width["positions"],
    }


def _t5_family_sizes(layers: tuple[int, int]) -> dict[str, Any]:
    width = TINY_WIDTH
    return {
        "d_model": width["d_model"],
        "d_kv": width["d_model"] // width["heads"],
        "d_ff": width["ffn"],
        "num_layers": layers[0],
        "num_decoder_layers": layers[1],
        "num_heads": width["heads"],
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 16,
    }


def make_tiny_marian(path: Path, *, layers: tuple[int, int] = (4, 2), seed: int = 0) -> Path:
    """Marian with the generation settings of opus-mt models (pad banned, forced eos)."""
    vocab = _vocabulary(MARIAN_SPECIALS)
    eos, pad = vocab["</s>"], vocab["<pad>"]
    tokens: dict[str, Any] = {"pad_token_id": pad, "eos_token_id": eos, "decoder_start_token_id": pad}
    config = MarianConfig(
        vocab_size=len(vocab), scale_embedding=True, forced_eos_token_id=eos, **tokens, **_bart_family_sizes(layers)
    )
    generation = generation_config(bad_words_ids=[[pad]], forced_eos_token_id=eos, num_beams=4, **tokens)
    model = spread_weights(MarianMTModel(config), seed, eos_boost=3.25)
    return _save(path, model, word_level_tokenizer(vocab, "$A </s>", TINY_WIDTH["positions"]), generation)


def make_tiny_bart(path: Path, *, layers: tuple[int, int] = (4, 2), seed: int = 0) -> Path:
    """BART with the generation settings of bart-large-cnn (length penalty, early stopping,
    n-gram blocking, forced bos/eos, a minimum length)."""
    vocab = _vocabulary(BART_SPECIALS)
    tokens: dict[str, Any] = {"bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 2}
    config = BartConfig(vocab_size=len(vocab), forced_eos_token_id=2, **tokens, **_bart_family_sizes(layers))
    generation = generation_config(
        forced_bos_token_id=0,
        forced_eos_token_id=2,
        early_stopping=True,
        length_penalty=2.0,
        no_repeat_ngram_size=3,
        min_length=3,
        num_beams=4,
        **tokens,
    )
    model = spread_weights(BartForConditionalGeneration(config), seed, eos_boost=3.0)
    return _save(path, model, word_level_tokenizer(vocab, "<s> $A </s>", TINY_WIDTH["positions"]), generation)


def make_tiny_mbart(path: Path, *, layers: tuple[int, int] = (2, 2), seed: int = 0) -> Path:
    """mBART: BART with pre-norm layers and a final encoder norm."""
    vocab = _vocabulary(BART_SPECIALS)
    tokens: dict[str, Any] = {"bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 2}
    config = MBartConfig(
        vocab_size=len(vocab), scale_embedding=True, forced_eos_token_id=2, **tokens, **_bart_family_sizes(layers)
    )
    generation = generation_config(forced_eos_token_id=2, **tokens)
    model = spread_weights(MBartForConditionalGeneration(config), seed)  # ends early unaided
    return _save(path, model, word_level_tokenizer(vocab, "$A </s>", TINY_WIDTH["positions"]), generation)


def make_tiny_pegasus(path: Path, *, layers: tuple[int, int] = (2, 2), seed: int = 0) -> Path:
    """Pegasus: sinusoidal positions, pre-norm layers, a final encoder norm."""
    vocab = _vocabulary(T5_SPECIALS)
    tokens: dict[str, Any] = {"pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}
    config = PegasusConfig(
        vocab_size=len(vocab), scale_embedding=True, forced_eos_token_id=1, **tokens, **_bart_family_sizes(layers)
    )
    generation = generation_config(forced_eos_token_id=1, length_penalty=0.8, num_beams=8, **tokens)
    model = spread_weights(PegasusForConditionalGeneration(config), seed, eos_boost=2.0)
    return _save(path, model, word_level_tokenizer(vocab, "$A </s>", TINY_WIDTH["positions"]), generation)


def make_tiny_t5(path: Path, *, layers: tuple[int, int] = (4, 2), seed: int = 0) -> Path:
    """T5 v1.1 style: relative position bias, gated-GELU feed-forward."""
    vocab = _vocabulary(T5_SPECIALS)
    tokens: dict[str, Any] = {"pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}
    config = T5Config(vocab_size=len(vocab), feed_forward_proj="gated-gelu", **tokens, **_t5_family_sizes(layers))
    model = spread_weights(T5ForConditionalGeneration(config), seed, eos_boost=2.0)
    return _save(path, model, word_level_tokenizer(vocab, "$A </s>", 512), generation_config(**tokens))


def make_tiny_mt5(path: Path, *, layers: tuple[int, int] = (2, 2), seed: int = 0) -> Path:
    """mT5: T5 v1.1 with untied output embeddings."""
    vocab = _vocabulary(T5_SPECIALS)
    tokens: dict[str, Any] = {"pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}
    config = MT5Config(vocab_size=len(vocab), **tokens, **_t5_family_sizes(layers))
    model = spread_weights(MT5ForConditionalGeneration(config), seed, eos_boost=2.0)
    return _save(path, model, word_level_tokenizer(vocab, "$A </s>", 512), generation_config(**tokens))


MAKERS: dict[str, Callable[..., Path]] = {
    "marian": make_tiny_marian,
    "bart": make_tiny_bart,
    "t5": make_tiny_t5,
    "mbart": make_tiny_mbart,
    "pegasus": make_tiny_pegasus,
    "mt5": make_tiny_mt5,
}
