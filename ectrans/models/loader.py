"""From a registry entry to a running executor: load (or accept) a model, split it, pipeline it.

Loading and segmenting are separate steps so that a model built elsewhere (for example on the
meta device with weights shared by another process) can be handed in as `model`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import transformers
from torch import nn

from ectrans.common.registry import ModelSpec
from ectrans.models.api import Executor
from ectrans.models.device import DeviceError, device_label, resolve_device, resolve_dtype, set_cpu_threads
from ectrans.models.encoder import EncoderTokenizer, build_encoder_segments, encoder_parts, read_pooling
from ectrans.models.noop import NoopExecutor
from ectrans.models.pipeline import DEFAULT_PARK_LIMIT_BYTES, BoundaryHook, PipelinedExecutor
from ectrans.models.profile import balance_splits, load_profile
from ectrans.models.segments import Segment

logger = logging.getLogger(__name__)

# Measured on a 2-core CPU (see the benchmark `ectrans.bench.pipeline`): one segment stage, with
# tokenisation and result encoding overlapping it, is as fast as any split there; a GPU profits
# from overlapping host work and kernels of neighbouring batches.
DEFAULT_SEGMENTS = {"cpu": 1, "cuda": 2}


def choose_device(requested: str, spec: ModelSpec) -> torch.device:
    """The call's device wins over the spec's unless it is `auto`."""
    return resolve_device(spec.device if requested == "auto" else requested)


def load_model(spec: ModelSpec, device: torch.device) -> nn.Module:
    """The model in the spec's dtype, in eval mode, with no gradients, on `device`."""
    transformers.utils.logging.disable_progress_bar()  # a server's log is no place for progress bars
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": resolve_dtype(spec.dtype)}
    if "attn_implementation" in spec.options:
        kwargs["attn_implementation"] = str(spec.options["attn_implementation"])
    if spec.kind == "seq2seq":
        model = transformers.AutoModelForSeq2SeqLM.from_pretrained(spec.path, **kwargs)
    else:
        model = transformers.AutoModel.from_pretrained(spec.path, **kwargs)
    return _ready(model, device)


def _ready(model: nn.Module, device: torch.device) -> nn.Module:
    model.eval().requires_grad_(False)
    return model.to(device)  # a no-op (no copy) for tensors already there, shared ones included


def encoder_splits(spec: ModelSpec, model: nn.Module, device: torch.device, n_segments: int) -> list[int]:
    """Balanced by the stored profile for this model, revision and device; else equal layer counts."""
    layers = encoder_parts(model).num_layers
    profile = load_profile(spec.name, spec.revision, device_label(device))
    if profile is not None and len(profile.units) == layers and profile.dtype == spec.dtype:
        return profile.splits(n_segments)
    return balance_splits([1.0] * layers, n_segments)


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
) -> Executor:
    """An executor for `spec`. `threads` is this executor's share of the CPU cores (intra-op
    threads); `segments` defaults per device kind and is capped at the model's layer count."""
    if spec.kind == "noop":
        return NoopExecutor(spec)
    torch_device = choose_device(device, spec)
    set_cpu_threads(threads)
    if model is None:
        model = load_model(spec, torch_device)
    else:
        model = _ready(model, torch_device)
    wanted = segments if segments is not None else DEFAULT_SEGMENTS.get(torch_device.type, 1)
    if wanted < 1:
        raise ValueError(f"{segments=} must be at least 1")
    segment_list, tokenize = _build_segments(spec, model, torch_device, wanted)
    logger.info(
        "[models] %s on %s: %d segment(s) %s", spec.name, torch_device, len(segment_list), [s.name for s in segment_list]
    )
    return PipelinedExecutor(
        spec,
        segment_list,
        tokenize,
        device=torch_device,
        threads=threads,
        queue_depth=queue_depth,
        park_limit_bytes=park_limit_bytes,
        between_segments=between_segments,
    )


def _build_segments(
    spec: ModelSpec, model: nn.Module, device: torch.device, wanted: int
) -> tuple[list[Segment], Any]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec.path, local_files_only=True)
    if spec.kind == "encoder":
        n_segments = min(wanted, encoder_parts(model).num_layers)
        splits = encoder_splits(spec, model, device, n_segments)
        segments = build_encoder_segments(model, splits, read_pooling(spec.path))
        return list(segments), EncoderTokenizer(tokenizer, spec.max_tokens)
    if spec.kind == "seq2seq":
        from ectrans.models.seq2seq import build_seq2seq_segments

        return build_seq2seq_segments(model, tokenizer, wanted, device, spec)
    raise ValueError(f"model {spec.name!r} has kind {spec.kind!r}, which no executor serves")
