"""The client's copy of a model: runs its first units locally and packs what they produce.

A `LocalModel` loads the same model directory the server serves (its revision must match, or the
server answers `version_mismatch`), splits it into the units of `ectrans.common.split` and runs
units[0:k] for a batch of texts, giving one split payload per text; with every unit local it gives
the final outputs itself. It also measures its own per-unit latency once (`profile`), cached on
disk, for the split-point chooser.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ectrans.common.registry import ModelSpec, build_spec
from ectrans.common.split import EMBED, FIRST_LAYER, pack_activation, unit_count, unit_names
from ectrans.models.device import device_label, resolve_device, set_cpu_threads
from ectrans.models.encoder import EncoderSegment, EncoderTokenizer, build_encoder_segments, encoder_parts, read_pooling
from ectrans.models.loader import load_model
from ectrans.models.profile import LatencyModel, profile_dir
from ectrans.models.results import to_python
from ectrans.models.segments import Segment, SegmentState
from ectrans.models.seq2seq import EncoderSegment as Seq2SeqEncoderSegment
from ectrans.models.seq2seq import Seq2SeqTokenizer, build_seq2seq_segments, encoder_stack

PROFILE_LENGTHS = (8, 32, 96)  # tokens: enough to fit overhead + per-token cost of each unit
PROFILE_REPEATS = 3
CLIENT_PROFILE_VERSION = 1


class LocalModel:
    """A model directory loaded on the client, runnable unit by unit."""

    def __init__(
        self,
        path: str | Path,
        *,
        name: str,
        device: str = "cpu",
        threads: int | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        import transformers

        self.spec: ModelSpec = build_spec(name, {"path": str(path), **(options or {})})
        if self.spec.num_layers <= 0:
            raise ValueError(f"model {name!r} at {path} has no layer count in its config: it cannot be split")
        set_cpu_threads(threads)
        self.device = resolve_device(device)
        self.model = load_model(self.spec, self.device)
        tokenizer = transformers.AutoTokenizer.from_pretrained(self.spec.path, local_files_only=True)
        self._lock = threading.Lock()  # one batch at a time: the tokenizer and torch threads are shared
        self.tokenize: EncoderTokenizer | Seq2SeqTokenizer
        if self.spec.kind == "encoder":
            self.tokenize = EncoderTokenizer(tokenizer, self.spec.max_tokens)
            self._encoder = encoder_parts(self.model)
            self._whole: list[Segment] = list(build_encoder_segments(self.model, 1, read_pooling(self.spec.path)))
        else:
            whole, self.tokenize = build_seq2seq_segments(self.model, tokenizer, 1, self.device, self.spec)
            self._stack = encoder_stack(self.model)
            self._whole = whole

    @property
    def revision(self) -> str:
        return self.spec.revision

    @property
    def units(self) -> list[str]:
        return unit_names(self.spec.num_layers, self.spec.kind)

    @property
    def all_local(self) -> int:
        """The split point at which every unit runs here (nothing is sent)."""
        return unit_count(self.spec.num_layers)

    def encode(self, texts: Sequence[str], params: dict[str, Any] | None = None) -> SegmentState:
        """Unit 0, tokenisation, alone: a caller that needs the token counts first (to choose a split
        point) passes the result on as `encoded` instead of tokenising twice."""
        return self.tokenize(list(texts), dict(params or {}))

    def payloads(
        self,
        texts: Sequence[str],
        k: int,
        params: dict[str, Any] | None = None,
        *,
        half: bool = False,
        encoded: SegmentState | None = None,
    ) -> list[bytes]:
        """Run units[0:k] (1 <= k < all_local) on `texts` (or on their `encode`d state); one payload per text."""
        if not 1 <= k < self.all_local:
            raise ValueError(f"split point {k} must be between 1 and {self.all_local - 1}")
        with self._lock, torch.inference_mode():
            state = self._front(k)(encoded if encoded is not None else self.encode(texts, params))
            return self._pack(state, k, half)

    def run_all(
        self, texts: Sequence[str], params: dict[str, Any] | None = None, *, encoded: SegmentState | None = None
    ) -> list[Any]:
        """Every unit here: the outputs the server would give (embedding vectors, translations)."""
        with self._lock, torch.inference_mode():
            state = _to(encoded if encoded is not None else self.encode(texts, params), self.device)
            for segment in self._whole:
                state = segment(state)
            assert state.outputs is not None
            return to_python(state.outputs)

    def _front(self, k: int) -> Callable[[SegmentState], SegmentState]:
        """units[1:k] as one callable (unit 0, tokenisation, is done by the caller)."""
        if k == EMBED:
            return lambda state: state
        layers = range(0, k - FIRST_LAYER)
        segment: Segment
        if self.spec.kind == "encoder":
            segment = EncoderSegment(self._encoder, layers, embed=True)
        else:
            segment = Seq2SeqEncoderSegment(self._stack, layers, embed=True, finish=False)
        return lambda state: segment(_to(state, self.device))

    def _pack(self, state: SegmentState, k: int, half: bool) -> list[bytes]:
        with_ids = k == EMBED or self.spec.kind == "seq2seq"  # a decoder's search reads the source ids
        types = state.extras.get("token_type_ids")
        out = []
        for row in range(state.mask.shape[0]):
            real = state.mask[row].bool()
            ids = state.input_ids[row][real].cpu().numpy() if with_ids else None
            row_types = types[row][real].cpu().numpy() if types is not None and k == EMBED else None
            hidden = None
            if k > EMBED:
                assert state.hidden is not None
                hidden = state.hidden[row][real].float().cpu().numpy()
                hidden = hidden.astype(np.float16) if half else hidden
            out.append(pack_activation(k, ids, hidden, row_types))
        return out

    # Profiling ---------------------------------------------------------------------------------

    def profile(self, cache_dir: str | Path | None = None, *, refresh: bool = False) -> list[LatencyModel]:
        """Per-unit latency models (batch, tokens → ms) on this client, measured once and cached."""
        path = profile_dir(cache_dir) / f"client--{self.spec.name}--{self.revision}--{device_label(self.device)}.json"
        if not refresh:
            cached = _read_profile(path, len(self.units))
            if cached is not None:
                return cached
        models = self._measure()
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {"version": CLIENT_PROFILE_VERSION, "units": self.units, "models": [asdict(m) for m in models]}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body, indent=1))
        tmp.replace(path)
        return models

    def _measure(self) -> list[LatencyModel]:
        """Each unit timed at batch 1 over a few lengths (median of repeats), then fitted."""
        samples: list[list[float]] = [[] for _ in self.units]
        points = []
        for tokens in PROFILE_LENGTHS:
            text = " ".join(["word"] * max(1, tokens - 2))
            points.append((1, tokens))
            runs = [self._time_units(text) for _ in range(PROFILE_REPEATS + 1)][1:]  # the first warms up
            for unit, times in enumerate(zip(*runs, strict=True)):
                samples[unit].append(statistics.median(times))
        return [LatencyModel.fit(points, ms) for ms in samples]

    def _time_units(self, text: str) -> list[float]:
        with self._lock, torch.inference_mode():
            started = time.perf_counter()
            state = _to(self.tokenize([text], {}), self.device)
            times = [_ms_since(started)]
            for k in range(EMBED, self.all_local):
                started = time.perf_counter()
                state = self._unit(k)(state)
                _sync(self.device)
                times.append(_ms_since(started))
            return times

    def _unit(self, k: int) -> Segment:
        """Unit k alone (1 <= k < all_local), as a segment run on a state where units[0:k] ran."""
        if k < FIRST_LAYER + self.spec.num_layers:
            layers = range(k - FIRST_LAYER, k - FIRST_LAYER + 1) if k >= FIRST_LAYER else range(0)
            embed = k == EMBED
            if self.spec.kind == "encoder":
                return EncoderSegment(self._encoder, layers, embed=embed)
            return Seq2SeqEncoderSegment(self._stack, layers, embed=embed, finish=False)
        return _Head(self._whole, self.spec.num_layers)


class _Head:
    """The last unit: the whole model's last segment, run on a state whose layers all ran here."""

    name = "head"
    layers: tuple[int, ...] = ()

    def __init__(self, whole: Sequence[Segment], num_layers: int) -> None:
        self.whole = whole
        self.num_layers = num_layers

    def __call__(self, state: SegmentState) -> SegmentState:
        state.start = FIRST_LAYER + self.num_layers  # every segment skips what already ran
        for segment in self.whole:
            state = segment(state)
        return state


def _read_profile(path: Path, units: int) -> list[LatencyModel] | None:
    try:
        body = json.loads(path.read_text())
        if body.get("version") != CLIENT_PROFILE_VERSION or len(body["models"]) != units:
            return None
        return [LatencyModel(float(m["a"]), float(m["b"]), float(m["c"])) for m in body["models"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _to(state: SegmentState, device: torch.device) -> SegmentState:
    from ectrans.models.batch import to_device

    return to_device(state, device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
