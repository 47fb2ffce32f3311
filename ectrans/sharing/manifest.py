"""The manifest of shared weights: what a holder exports and an executor attaches, written once for
both sides (`export.py`, `attach.py`): every tensor's names, storage, dtype, shape, stride and
offset, and every storage's place in the shared file (CPU) or its IPC handle (CUDA); and a model's
spec as it travels to the holder and executor processes.
"""

from __future__ import annotations

import contextlib
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ectrans.common.registry import ModelSpec

MANIFEST_VERSION = 1
DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


class AttachError(RuntimeError):
    """Shared weights that cannot be attached to this model; the message says why."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the model, under every name it has (tied weights have several)."""

    names: tuple[str, ...]
    is_param: bool
    storage: int  # index into Manifest.storages; -1 for an empty tensor
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # in elements, from the start of its storage

    def to_wire(self) -> list[Any]:
        shape, stride = list(self.shape), list(self.stride)
        return [list(self.names), self.is_param, self.storage, self.dtype, shape, stride, self.offset]

    @classmethod
    def from_wire(cls, raw: list[Any]) -> TensorEntry:
        names, is_param, storage, dtype, shape, stride, offset = raw
        if dtype not in DTYPES:
            raise AttachError(f"the manifest names dtype {dtype!r}, which attaching does not support")
        return cls(tuple(names), bool(is_param), int(storage), str(dtype), tuple(shape), tuple(stride), int(offset))


@dataclass(frozen=True)
class StorageEntry:
    """One exported storage: where it lies in the shared file (CPU) or its IPC handle (CUDA)."""

    nbytes: int
    offset: int = 0  # CPU: byte offset in the shared file
    ipc: tuple[Any, ...] | None = None  # CUDA: the 8 values of `UntypedStorage._share_cuda_()`

    def to_wire(self) -> list[Any]:
        return [self.nbytes, self.offset, None if self.ipc is None else list(self.ipc)]

    @classmethod
    def from_wire(cls, raw: list[Any]) -> StorageEntry:
        nbytes, offset, ipc = raw
        return cls(int(nbytes), int(offset), None if ipc is None else tuple(ipc))


@dataclass(frozen=True)
class Manifest:
    """What an executor needs to attach: the model it is for and every tensor's place."""

    model: str
    revision: str
    dtype: str
    device: str
    holder_pid: int
    storages: tuple[StorageEntry, ...]
    tensors: tuple[TensorEntry, ...]
    file_bytes: int = 0  # CPU: size of the shared file

    @property
    def weights_bytes(self) -> int:
        """Bytes of weights held once for every executor."""
        return sum(storage.nbytes for storage in self.storages)

    def to_wire(self) -> dict[str, Any]:
        return {
            "version": MANIFEST_VERSION,
            "model": self.model,
            "revision": self.revision,
            "dtype": self.dtype,
            "device": self.device,
            "holder_pid": self.holder_pid,
            "file_bytes": self.file_bytes,
            "storages": [s.to_wire() for s in self.storages],
            "tensors": [t.to_wire() for t in self.tensors],
        }

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Manifest:
        if raw.get("version") != MANIFEST_VERSION:
            raise AttachError(f"manifest version {raw.get('version')!r}; this executor reads {MANIFEST_VERSION}")
        return cls(
            model=str(raw["model"]),
            revision=str(raw["revision"]),
            dtype=str(raw["dtype"]),
            device=str(raw["device"]),
            holder_pid=int(raw["holder_pid"]),
            file_bytes=int(raw["file_bytes"]),
            storages=tuple(StorageEntry.from_wire(s) for s in raw["storages"]),
            tensors=tuple(TensorEntry.from_wire(t) for t in raw["tensors"]),
        )

    def check_for(self, spec: ModelSpec) -> None:
        """The holder serves the model this executor was configured for."""
        held = (self.model, self.revision, self.dtype)
        wanted = (spec.name, spec.revision, spec.dtype)
        if held != wanted:
            raise AttachError(f"the holder serves (model, revision, dtype) {held}, this executor wants {wanted}")


def advise_huge_pages(mapping: mmap.mmap) -> None:
    """Ask for transparent huge pages (fewer TLB misses on large weights). Takes effect only
    where the host allows it for shared memory (/sys/kernel/mm/transparent_hugepage/shmem_enabled
    set to `advise`, `within_size` or `always`); harmless elsewhere."""
    with contextlib.suppress(AttributeError, OSError):
        mapping.madvise(mmap.MADV_HUGEPAGE)


# Specs across processes ------------------------------------------------------------------------------------


def spec_to_wire(spec: ModelSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "path": str(spec.path),
        "kind": spec.kind,
        "model_type": spec.model_type,
        "ops": sorted(spec.ops),
        "dtype": spec.dtype,
        "device": spec.device,
        "max_tokens": spec.max_tokens,
        "revision": spec.revision,
        "options": dict(spec.options),
    }


def spec_from_wire(raw: dict[str, Any]) -> ModelSpec:
    return ModelSpec(
        name=str(raw["name"]),
        path=Path(raw["path"]),
        kind=str(raw["kind"]),
        model_type=str(raw["model_type"]),
        ops=frozenset(raw["ops"]),
        dtype=str(raw["dtype"]),
        device=str(raw["device"]),
        max_tokens=int(raw["max_tokens"]),
        revision=str(raw["revision"]),
        options=dict(raw["options"]),
    )
