"""Random-weight models of real sizes, built from configs, for benchmarks (no hub, no download).

Each `make_*` function writes a Hugging Face model directory (config, generation config, weights,
tokenizer) that `from_pretrained` loads offline and `common.registry.build_spec` classifies. The
tokenizers are word-level over a small English vocabulary padded with filler tokens, so no
sentencepiece model is needed and every id a model can emit decodes to text. The test suite's
tiny models (`tests/tiny_seq2seq.py`) use the same vocabulary and tokenizer helpers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertModel,
    GenerationConfig,
    MarianConfig,
    MarianMTModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

_WORD_LIST = (
    "the a an and or but of to in on at for with from by as is are was were be been has have had do "
    "does did not no yes this that these those it its he she they we you i me my your our their "
    "cat dog bird fish house car tree road city river sea sky sun moon star day night time year "
    "good bad big small new old red blue green white black fast slow happy sad "
    "go goes went see saw make made take took come came run runs eat eats read reads write writes "
    "hello world thanks please translate sentence word text model server edge batch queue"
)
WORDS = _WORD_LIST.split()
PUNCTUATION = [".", ",", "!", "?", "'", "-", ":", ";"]

PROTOTYPE_VOCAB = 95_000  # with Marian 6+6 layers of width 512 this gives about 93M parameters
T5_LARGE_VOCAB = 32_128

# Special tokens in id order, per family (the ids the model configs name).
MARIAN_SPECIALS = ("</s>", "<unk>", "<pad>")  # opus-mt order for eos and unk (pad is last there)
T5_SPECIALS = ("<pad>", "</s>", "<unk>")
BART_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MINILM_VOCAB = 30_522


def vocabulary(specials: Sequence[str], size: int | None = None) -> dict[str, int]:
    """Specials first, then words, then filler tokens up to `size`."""
    tokens = [*specials, *WORDS, *PUNCTUATION]
    if size is not None:
        if size < len(tokens):
            raise ValueError(f"vocabulary size {size} is below the {len(tokens)} built-in tokens")
        tokens += [f"tok{i}" for i in range(size - len(tokens))]
    return {token: index for index, token in enumerate(tokens)}


def word_level_tokenizer(vocab: dict[str, int], template: str, max_length: int) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer; `template` adds the family's special tokens (e.g. "$A </s>")."""
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    used = sorted({piece for piece in template.split() if piece in vocab})
    backend.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(piece, vocab[piece]) for piece in used]
    )
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    specials = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    if "<s>" in vocab:
        specials["bos_token"] = "<s>"
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend, model_max_length=max_length, **specials
    )


def generation_config(**settings: Any) -> GenerationConfig:
    return GenerationConfig(**settings)  # type: ignore[no-untyped-call]


def save(
    path: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    generation: GenerationConfig,
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.generation_config = generation
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_prototype_marian(path: Path, *, seed: int = 0) -> Path:
    """The prototype's translation model size: Marian 6+6 layers, d_model 512, about 93M parameters.

    Random weights (for latency, throughput and memory benchmarks, not for translations).
    """
    vocab = vocabulary(MARIAN_SPECIALS, PROTOTYPE_VOCAB)
    eos, pad = vocab["</s>"], vocab["<pad>"]
    tokens: dict[str, Any] = {"pad_token_id": pad, "eos_token_id": eos, "decoder_start_token_id": pad}
    config = MarianConfig(
        vocab_size=len(vocab),
        d_model=512,
        encoder_layers=6,
        decoder_layers=6,
        encoder_attention_heads=8,
        decoder_attention_heads=8,
        encoder_ffn_dim=2048,
        decoder_ffn_dim=2048,
        max_position_embeddings=512,
        activation_function="swish",
        scale_embedding=True,
        forced_eos_token_id=eos,
        **tokens,
    )
    generation = generation_config(
        bad_words_ids=[[pad]], forced_eos_token_id=eos, max_length=512, num_beams=4, **tokens
    )
    torch.manual_seed(seed)
    model = MarianMTModel(config)  # the default initialisation: fine at this width
    return save(path, model, word_level_tokenizer(vocab, "$A </s>", 512), generation)


def make_t5_large_shape(path: Path, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A T5-large-shaped model (24+24 layers, d_model 1024, d_ff 4096, 16 heads; about 737M
    parameters), random weights saved in `dtype` (bf16 halves the file; loading converts to the
    serving dtype as for any checkpoint)."""
    vocab = vocabulary(T5_SPECIALS, T5_LARGE_VOCAB)
    tokens: dict[str, Any] = {"pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}
    config = T5Config(
        vocab_size=len(vocab),
        d_model=1024,
        d_kv=64,
        d_ff=4096,
        num_layers=24,
        num_decoder_layers=24,
        num_heads=16,
        feed_forward_proj="relu",
        **tokens,
    )
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = T5ForConditionalGeneration(config)
    model.to_empty(device="cpu")
    torch.nn.Module.to(model, dtype)
    with torch.no_grad():  # faster than the default initialisation, same scale
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, parameter.shape[-1] ** -0.5)
            else:  # the layer norms' scales
                parameter.fill_(1.0)
    model.tie_weights()
    model.train(False)
    return save(path, model, word_level_tokenizer(vocab, "$A </s>", 512), generation_config(**tokens))


def make_minilm_shape(path: Path, *, seed: int = 0) -> Path:
    """An all-MiniLM-L6-v2-shaped BERT (6 layers, hidden 384, 12 heads, vocabulary 30,522; about
    22.7M parameters), random weights: the default model's cost where its package is not installed
    (a GPU host without network)."""
    vocab = vocabulary(BERT_SPECIALS, MINILM_VOCAB)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend,
        model_max_length=256,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    model = BertModel(config)
    model.train(False)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
