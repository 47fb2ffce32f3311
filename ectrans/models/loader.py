"""From a registry entry to a running executor: load (or accept) a model, split it, pipeline it.

Loading and segmenting are separate steps so that a model built elsewhere (for example on the
meta device with weights shared by another process) can be handed in as `model`.

torch and transformers are imported only when a real model is loaded, so a worker that serves
the no-op model starts in a fraction of a second and stays small.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ectrans.common.registry import ModelSpec
from ectrans.models.api import Executor
from ectrans.models.noop import NoopExecutor

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ectrans.models.pipeline import BoundaryHook
    from ectrans.models.resume import Resume
    from ectrans.models.segments import Segment

logger = logging.getLogger(__name__)

# Segment stages when the caller does not say. Two give real-time work a boundary halfway through
# a batch. On a 2-core CPU, 1 to 4 stages ran MiniLM and a small Marian within noise of the unsplit
# loop (`ectrans bench pipeline`), so the boundary costs no throughput there; on a GPU the two
# stages run on two streams, overlapping one batch's kernels with the next one's host work.
DEFAULT_SEGMENTS = {"cpu": 2, "cuda": 2}
DEFAULT_PARK_LIMIT_BYTES = 512 * 2**20


def choose_device(requested: str, spec: ModelSpec) -> torch.device:
    """The call's device wins over the spec's unless it is `auto`."""
    from ectrans.models.device import resolve_device

    return resolve_device(spec.device if requested == "auto" else requested)


def load_model(spec: ModelSpec, device: torch.device) -> nn.Module:
    """The model in the spec's dtype, in eval mode, with no gradients, on `device`."""
    import transformers

    from ectrans.models.device import resolve_dtype

    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # no bars in server logs
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": resolve_dtype(spec.dtype)}
    if "attn_implementation" in spec.options:
        kwargs["attn_implementation"] = str(spec.options["attn_implementation"])
    auto = transformers.AutoModelForSeq2SeqLM if spec.kind == "seq2seq" else transformers.AutoModel
    return _ready(auto.from_pretrained(spec.path, **kwargs), device)


def _ready(model: nn.Module, device: torch.device) -> nn.Module:
    model.eval().requires_grad_(False)
    return model.to(device)  # no copy for tensors already there, shared ones included


def encoder_splits(spec: ModelSpec, model: nn.Module, device: torch.device, n_segments: int) -> list[int]:
    """Balanced by the stored profile for this model, revision, device and dtype; else equal layer counts."""
    from ectrans.models.encoder import encoder_parts
    from ectrans.models.profile import balance_splits

    layers = encoder_parts(model).num_layers
    profiled = _profiled_splits(spec, device, layers, 0, n_segments)
    return profiled if profiled is not None else balance_splits([1.0] * layers, n_segments)


def seq2seq_splits(spec: ModelSpec, model: nn.Module, device: torch.device, n_segments: int) -> list[int]:
    """Where encoder segments 2..n start for a seq2seq model: balanced over the encoder units of the
    stored profile (as `encoder_splits`; the decode segments follow apart), else even layer counts."""
    from ectrans.models.encoder import even_splits
    from ectrans.models.seq2seq import encoder_stack

    layers = len(encoder_stack(model).layers)
    profiled = _profiled_splits(spec, device, layers, 1, n_segments)
    return profiled if profiled is not None else even_splits(layers, n_segments)


def _profiled_splits(
    spec: ModelSpec, device: torch.device, layers: int, decode_units: int, n_segments: int
) -> list[int] | None:
    """The stored profile's balanced points when it matches this model (revision, device, dtype, and
    its units: `layers` encoder layers then `decode_units` decode units); else None."""
    from ectrans.models.device import device_label
    from ectrans.models.profile import load_profile

    profile = load_profile(spec.name, spec.revision, device_label(device))
    if (
        profile is not None
        and profile.dtype == spec.dtype
        and profile.encoder_units == layers
        and profile.decode_units == decode_units
    ):
        return profile.splits(n_segments)
    return None


def load_executor(
    spec: ModelSpec,
    *,
    device: str = "auto",
    threads: int | None = None,
    segments: int | None = None,
    queue_depth: int = 2,
    model: nn.Module | None = None,
    park_limit_bytes: int = DEFAULT_PARK_LIMIT_BYTES,
    between_segments: BoundaryHook | None = None,
    trace: bool = True,
    realtime_lane: bool | None = None,
) -> Executor:
    """An executor for `spec`.

    `threads`: this executor's share of the CPU cores (torch intra-op threads, split between the
    segment stages). `segments`: segment stages (encoder segments for seq2seq, whose decode
    segments come from the registry option `decode_segments`); default per device kind, capped
    at the layer count. `model`: a prebuilt model to use instead of loading `spec.path`. `trace`:
    on a CPU, encoder layers run as checked TorchScript traces (`ectrans.models.traced`).
    `realtime_lane`: real-time batches on a thread of their own instead of cutting in between
    segments (default: on a CPU; `ectrans.models.pipeline`).
    """
    if spec.kind == "noop":
        return NoopExecutor(spec)
    from ectrans.models.device import set_cpu_threads
    from ectrans.models.pipeline import PipelinedExecutor

    torch_device = choose_device(device, spec)
    set_cpu_threads(threads)
    model = load_model(spec, torch_device) if model is None else _ready(model, torch_device)
    wanted = segments if segments is not None else DEFAULT_SEGMENTS.get(torch_device.type, 1)
    if wanted < 1:
        raise ValueError(f"{segments=} must be at least 1")
    segment_list, tokenize = _build_segments(spec, model, torch_device, wanted, trace and torch_device.type == "cpu")
    resume = _resume(spec, model, tokenize)
    names = [segment.name for segment in segment_list]
    logger.info("[models] %s on %s: %d segment(s) %s", spec.name, torch_device, len(names), names)
    return PipelinedExecutor(
        spec,
        segment_list,
        tokenize,
        device=torch_device,
        threads=threads,
        queue_depth=queue_depth,
        park_limit_bytes=park_limit_bytes,
        between_segments=between_segments,
        resume=resume,
        realtime_lane=realtime_lane,
    )


def _resume(spec: ModelSpec, model: nn.Module, tokenize: Any) -> Resume | None:
    """How split tasks resume on this model (None when the registry knows no layer count for it)."""
    from ectrans.models.generation_params import parse_generation_params
    from ectrans.models.resume import Resume

    if spec.num_layers <= 0 or spec.hidden_size <= 0:
        return None
    texts = getattr(tokenize, "texts", tokenize)  # a seq2seq stage 0 wraps an encoder tokenizer
    limits = getattr(tokenize, "limits", None)
    return Resume(
        spec,
        dtype=next(model.parameters()).dtype,
        pad_token_id=int(texts.tokenizer.pad_token_id or 0),
        max_tokens=texts.max_tokens,
        check_params=None if limits is None else lambda params: parse_generation_params(params, limits),
    )


def _build_segments(
    spec: ModelSpec, model: nn.Module, device: torch.device, wanted: int, trace: bool
) -> tuple[list[Segment], Any]:
    import transformers

    from ectrans.models.encoder import EncoderTokenizer, build_encoder_segments, encoder_parts, read_pooling

    tokenizer = transformers.AutoTokenizer.from_pretrained(spec.path, local_files_only=True)
    if spec.kind == "encoder":
        n_segments = min(wanted, encoder_parts(model).num_layers)
        splits = encoder_splits(spec, model, device, n_segments)
        segments = build_encoder_segments(model, splits, read_pooling(spec.path), trace=trace)
        return list(segments), EncoderTokenizer(tokenizer, spec.max_tokens)
    if spec.kind == "seq2seq":
        from ectrans.models.seq2seq import build_seq2seq_segments, encoder_stack

        n_segments = min(wanted, len(encoder_stack(model).layers))
        return build_seq2seq_segments(model, tokenizer, seq2seq_splits(spec, model, device, n_segments), device, spec)
    raise ValueError(f"model {spec.name!r} has kind {spec.kind!r}, which no executor serves")
