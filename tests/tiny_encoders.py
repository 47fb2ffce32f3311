"""Random-weight encoder models built in code, saved with a tokenizer built in code.

Each `make_*` function writes a Hugging Face model directory (config, weights, tokenizer) that
`AutoModel.from_pretrained` and `AutoTokenizer.from_pretrained` load offline and that
`common.registry.build_spec` classifies as kind "encoder" (op `embed`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaModel,
    XLMRobertaConfig,
    XLMRobertaModel,
)

_WORD_TEXT = (
    "the a an and or but of to in on at for with from by as is are was were be been has have had "
    "it its he she they we you i my your our their this that not no yes "
    "cat dog bird fish house car tree road city river sea sky sun moon day night time year "
    "good bad big small new old red blue green fast slow happy sad "
    "go went see saw make made take run eat read write hello world thanks please "
    "model server edge batch queue token segment pipeline"
)
WORDS = _WORD_TEXT.split()
PUNCTUATION = [".", ",", "!", "?", "'", "-", ":", ";"]

# Different lengths, so every batch carries padding; the last one is longer than MAX_TOKENS words.
SENTENCES = [
    "hello world .",
    "the cat saw a dog in the house , and the dog ran to the river .",
    "we read a good book",
    "thanks !",
    "my old car is slow but it goes , it goes every day to the city and back .",
    " ".join(["the big red dog ran to the sea and saw the moon ."] * 8),
]

HIDDEN = 32
LAYERS = 4
MAX_TOKENS = 64

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")


def _vocabulary(specials: tuple[str, ...]) -> dict[str, int]:
    return {token: index for index, token in enumerate([*specials, *WORDS, *PUNCTUATION])}


def _tokenizer(
    specials: tuple[str, ...], template: str, names: dict[str, str], with_token_types: bool
) -> PreTrainedTokenizerFast:
    """A lower-casing whole-word WordPiece tokenizer; `template` adds the family's special tokens."""
    vocab = _vocabulary(specials)
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token=names["unk_token"]))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    used = [piece for piece in template.split() if piece in vocab]
    backend.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(piece, vocab[piece]) for piece in dict.fromkeys(used)]
    )
    input_names = ["input_ids", "token_type_ids", "attention_mask"]
    if not with_token_types:
        input_names.remove("token_type_ids")
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend,
        model_max_length=MAX_TOKENS,
        model_input_names=input_names,
        **names,
    )


def _bert_tokenizer(with_token_types: bool = True) -> PreTrainedTokenizerFast:
    names = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"}
    return _tokenizer(BERT_SPECIALS, "[CLS] $A [SEP]", names | {"mask_token": "[MASK]"}, with_token_types)


def _roberta_tokenizer() -> PreTrainedTokenizerFast:
    names = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    names |= {"cls_token": "<s>", "sep_token": "</s>", "mask_token": "<mask>"}
    return _tokenizer(ROBERTA_SPECIALS, "<s> $A </s>", names, with_token_types=False)


def _seeded(model: PreTrainedModel, seed: int) -> PreTrainedModel:
    """Weights of std 1/sqrt(fan-in): the default init (std 0.02) makes every input look alike at
    this width, which would let a wrong mask pass unnoticed."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, parameter.shape[-1] ** -0.5)
    model.train(False)
    return model


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_tiny_bert(path: Path, *, layers: int = LAYERS, hidden: int = HIDDEN, seed: int = 0) -> Path:
    config = BertConfig(
        vocab_size=len(_vocabulary(BERT_SPECIALS)),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=MAX_TOKENS,
        pad_token_id=0,
    )
    return _save(_seeded(BertModel(config), seed), _bert_tokenizer(), path)


def make_tiny_roberta(path: Path, *, layers: int = LAYERS, seed: int = 0) -> Path:
    config = RobertaConfig(
        vocab_size=len(_vocabulary(ROBERTA_SPECIALS)),
        hidden_size=HIDDEN,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * HIDDEN,
        max_position_embeddings=MAX_TOKENS + 2,  # positions start after the padding index
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
    )
    return _save(_seeded(RobertaModel(config), seed), _roberta_tokenizer(), path)


def make_tiny_xlm_roberta(path: Path, *, layers: int = LAYERS, seed: int = 0) -> Path:
    config = XLMRobertaConfig(
        vocab_size=len(_vocabulary(ROBERTA_SPECIALS)),
        hidden_size=HIDDEN,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * HIDDEN,
        max_position_embeddings=MAX_TOKENS + 2,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
    )
    return _save(_seeded(XLMRobertaModel(config), seed), _roberta_tokenizer(), path)


def make_tiny_distilbert(path: Path, *, layers: int = LAYERS, seed: int = 0) -> Path:
    config = DistilBertConfig(
        vocab_size=len(_vocabulary(BERT_SPECIALS)),
        dim=HIDDEN,
        n_layers=layers,
        n_heads=4,
        hidden_dim=2 * HIDDEN,
        max_position_embeddings=MAX_TOKENS,
        pad_token_id=0,
    )
    return _save(_seeded(DistilBertModel(config), seed), _bert_tokenizer(with_token_types=False), path)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for the block. OpenMP teams spin at barriers, so on a busy shared host
    two threads can run a small model several times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


MAKERS: dict[str, Callable[..., Path]] = {
    "bert": make_tiny_bert,
    "roberta": make_tiny_roberta,
    "xlm-roberta": make_tiny_xlm_roberta,
    "distilbert": make_tiny_distilbert,
}
