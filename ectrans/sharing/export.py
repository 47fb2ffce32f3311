"""Export (the weight holder): the model is loaded once in its serving dtype; every parameter and
buffer becomes a manifest entry (names, storage index, dtype, shape, stride, offset), and every
distinct storage is exported once, so tensors that share a storage (tied embeddings) stay tied:

- CPU: the storages are written once into a sealed memfd (`memfd_create`, then F_SEAL_WRITE |
  F_SEAL_SHRINK | F_SEAL_GROW): shared memory that nobody, the holder included, can write any
  more. The memfd travels to executors over a Unix socket (SCM_RIGHTS); no file is left behind in
  /dev/shm, and the memory is freed when the last process holding it goes.
- CUDA: one IPC handle per storage from torch's own sharing machinery (`_share_cuda_`, as
  `torch.multiprocessing.reductions` does), made once and sent to every executor; the holder keeps
  its tensors (the producer must outlive every importer, per torch's CUDA IPC rules).
"""

from __future__ import annotations

import fcntl
import mmap
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ectrans.common.registry import ModelSpec
from ectrans.sharing.manifest import DTYPES, AttachError, Manifest, StorageEntry, TensorEntry, advise_huge_pages

ALIGN = 64  # byte alignment of each storage in the shared file (SIMD loads, every dtype's itemsize)
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


@dataclass
class _Group:
    """Tensors of one storage."""

    storage: torch.UntypedStorage
    members: list[tuple[torch.Tensor, list[str], bool]] = field(default_factory=list)


def _model_tensors(model: nn.Module) -> list[tuple[torch.Tensor, list[str], bool]]:
    """Every parameter and buffer once, with all the names it goes by."""
    found: dict[int, tuple[torch.Tensor, list[str], bool]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        found.setdefault(id(param), (param, [], True))[1].append(name)
    for name, buffer in model.named_buffers(remove_duplicate=False):
        found.setdefault(id(buffer), (buffer, [], False))[1].append(name)
    return list(found.values())


def _groups(model: nn.Module) -> tuple[list[_Group], list[tuple[torch.Tensor, list[str], bool]]]:
    """Tensors grouped by storage (in first-seen order), and the empty ones apart."""
    groups: dict[int, _Group] = {}
    empty = []
    for tensor, names, is_param in _model_tensors(model):
        if tensor.numel() == 0:
            empty.append((tensor, names, is_param))
            continue
        storage = tensor.untyped_storage()
        groups.setdefault(storage._cdata, _Group(storage)).members.append((tensor, names, is_param))
    return list(groups.values()), empty


def _extent_bytes(tensor: torch.Tensor) -> int:
    span = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
    return span * tensor.element_size()


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise AttachError(f"cannot share a tensor of dtype {name}")
    return name


def _entry(tensor: torch.Tensor, names: list[str], is_param: bool, storage: int, offset: int) -> TensorEntry:
    return TensorEntry(
        tuple(names), is_param, storage, _dtype_name(tensor.dtype), tuple(tensor.shape), tuple(tensor.stride()), offset
    )


def _round_up(value: int, step: int = ALIGN) -> int:
    return -(-value // step) * step


def summary(model: nn.Module) -> dict[str, int]:
    """Bytes, storages and tensors the model's weights take (each storage counted once)."""
    groups, empty = _groups(model)
    return {
        "weights_bytes": sum(group.storage.nbytes() for group in groups),
        "storages": len(groups),
        "tensors": len(empty) + sum(len(group.members) for group in groups),
    }


def export_cpu(model: nn.Module, spec: ModelSpec) -> tuple[Manifest, int]:
    """Write the model's storages once into a sealed memfd; the manifest and the memfd's descriptor.

    Only the bytes the tensors use are written (a storage may be a view into a larger buffer,
    such as a memory-mapped checkpoint).
    """
    groups, empty = _groups(model)
    storages: list[StorageEntry] = []
    tensors = [_entry(t, names, is_param, -1, 0) for t, names, is_param in empty]
    spans: list[tuple[torch.UntypedStorage, int, int]] = []  # storage, first byte, end byte
    position = 0
    for index, group in enumerate(groups):
        starts = [int(t.storage_offset()) * t.element_size() for t, _, _ in group.members]
        first = min(starts) // ALIGN * ALIGN
        end = max(start + _extent_bytes(t) for start, (t, _, _) in zip(starts, group.members, strict=True))
        size = _round_up(end - first)
        end = min(first + size, group.storage.nbytes())
        storages.append(StorageEntry(nbytes=size, offset=position))
        spans.append((group.storage, first, end))
        for start, (tensor, names, is_param) in zip(starts, group.members, strict=True):
            tensors.append(_entry(tensor, names, is_param, index, (start - first) // tensor.element_size()))
        position += size
    fd = os.memfd_create(f"ectrans-weights-{spec.name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, max(position, ALIGN))
        writer = mmap.mmap(fd, max(position, ALIGN), flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            advise_huge_pages(writer)
            for (storage, first, end), entry in zip(spans, storages, strict=True):
                writer[entry.offset : entry.offset + end - first] = _storage_bytes(storage, first, end)
        finally:
            writer.close()  # F_SEAL_WRITE needs every writable mapping gone
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    manifest = Manifest(
        model=spec.name,
        revision=spec.revision,
        dtype=spec.dtype,
        device="cpu",
        holder_pid=os.getpid(),
        storages=tuple(storages),
        tensors=tuple(tensors),
        file_bytes=max(position, ALIGN),
    )
    return manifest, fd


def _storage_bytes(storage: torch.UntypedStorage, first: int, end: int) -> memoryview:
    as_bytes = torch.empty(0, dtype=torch.uint8).set_(storage)
    return memoryview(as_bytes[first:end].numpy().data)


def export_cuda(model: nn.Module, spec: ModelSpec) -> Manifest:
    """CUDA IPC handles for every storage. Call it once and give every executor the same manifest:
    each call wraps the storages in another ref-counted sharing context and CUDA event. The caller
    keeps `model` alive for as long as any executor may use them."""
    groups, empty = _groups(model)
    storages: list[StorageEntry] = []
    tensors = [_entry(t, names, is_param, -1, 0) for t, names, is_param in empty]
    device = ""
    for index, group in enumerate(groups):
        ipc = group.storage._share_cuda_()  # type: ignore[no-untyped-call]
        storages.append(StorageEntry(nbytes=group.storage.nbytes(), ipc=tuple(ipc)))
        for tensor, names, is_param in group.members:
            tensors.append(_entry(tensor, names, is_param, index, int(tensor.storage_offset())))
            device = str(tensor.device)
    return Manifest(
        model=spec.name,
        revision=spec.revision,
        dtype=spec.dtype,
        device=device,
        holder_pid=os.getpid(),
        storages=tuple(storages),
        tensors=tuple(tensors),
    )
