"""One copy of a model's weights per device, attached by every executor process without copying.

Why one module of this length: export and attach are the two halves of one manifest format (CPU
memfd and CUDA IPC paths); keeping them together keeps the format defined once.

Export (the weight holder): the model is loaded once in its serving dtype; every parameter and
buffer becomes a manifest entry (names, storage index, dtype, shape, stride, offset), and every
distinct storage is exported once, so tensors that share a storage (tied embeddings) stay tied:

- CPU: the storages are written once into a sealed memfd (`memfd_create`, then F_SEAL_WRITE |
  F_SEAL_SHRINK | F_SEAL_GROW): shared memory that nobody, the holder included, can write any
  more. The memfd travels to executors over a Unix socket (SCM_RIGHTS); no file is left behind in
  /dev/shm, and the memory is freed when the last process holding it goes.
- CUDA: one IPC handle per storage from torch's own sharing machinery (`_share_cuda_`, as
  `torch.multiprocessing.reductions` does), made once and sent to every executor; the holder keeps
  its tensors (the producer must outlive every importer, per torch's CUDA IPC rules).

Attach (an executor): the model is built on the `meta` device from its config, then every
parameter and buffer is replaced by a tensor over the shared memory (`torch.frombuffer` over a
read-only mapping on CPU, `UntypedStorage._new_shared_cuda` on CUDA). Nothing is copied.

Read-only, by two mechanisms:
1. `protect()` marks every shared storage so that taking a mutable data pointer raises. An
   in-place write through torch (`add_`, `copy_`, `zero_`, `__setitem__`, `.numpy()`) raises
   `RuntimeError("Cannot access data pointer of Tensor ...")` in the writing process and changes
   nothing. Reading kernels take const pointers and run unchanged (checked at attach by a warm-up).
2. On CPU the mapping itself is PROT_READ of a write-sealed memfd: a write that bypasses torch
   (ctypes, a raw pointer in an extension) gets SIGSEGV in that process only; the shared pages
   cannot change, so the other processes are unaffected.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import itertools
import logging
import mmap
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from ectrans.common.registry import ModelSpec
from ectrans.models.device import resolve_dtype

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
ALIGN = 64  # byte alignment of each storage in the shared file (SIMD loads, every dtype's itemsize)
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
_DTYPES = {
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
_READONLY_WARNING = "The given buffer is not writable"


class AttachError(RuntimeError):
    """Shared weights that cannot be attached to this model; the message says why."""


# 1. The manifest ------------------------------------------------------------------------------------


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
        if dtype not in _DTYPES:
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


# 2. Export (the holder) -----------------------------------------------------------------------------


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
    if name not in _DTYPES:
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
            _advise_huge_pages(writer)
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


def _advise_huge_pages(mapping: mmap.mmap) -> None:
    """Ask for transparent huge pages (fewer TLB misses on large weights). Takes effect only
    where the host allows it for shared memory (/sys/kernel/mm/transparent_hugepage/shmem_enabled
    set to `advise`, `within_size` or `always`); harmless elsewhere."""
    with contextlib.suppress(AttributeError, OSError):
        mapping.madvise(mmap.MADV_HUGEPAGE)


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


# 3. Attach (an executor) ------------------------------------------------------------------------------


@dataclass
class SharedTensors:
    """The tensors of a manifest over shared memory, and what keeps that memory mapped."""

    manifest: Manifest
    tensors: list[tuple[TensorEntry, torch.Tensor]]
    mapping: mmap.mmap | None = None


def _readonly_map(fd: int, size: int) -> mmap.mmap:
    """A read-only shared mapping, its page tables filled at once (no faults on the first batch,
    and the pages count in this process's PSS from the start)."""
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    mapping = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ)
    _advise_huge_pages(mapping)
    return mapping


def attach_cpu(manifest: Manifest, fd: int) -> SharedTensors:
    """Tensors over a read-only mapping of the holder's sealed memfd (`fd` may be closed after)."""
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    if seals & fcntl.F_SEAL_WRITE == 0:
        raise AttachError("the shared weights file is not sealed against writes")
    if os.fstat(fd).st_size < manifest.file_bytes:
        raise AttachError(f"the shared weights file is smaller than the manifest's {manifest.file_bytes} bytes")
    mapping = _readonly_map(fd, manifest.file_bytes)
    bases: list[torch.Tensor] = []
    with warnings.catch_warnings():
        # torch warns that a tensor over a non-writable buffer could be written through; here a
        # write raises (`protect`) or faults (PROT_READ), which is exactly what we want.
        warnings.filterwarnings("ignore", message=_READONLY_WARNING, category=UserWarning)
        for storage in manifest.storages:
            bases.append(torch.frombuffer(mapping, dtype=torch.uint8, count=storage.nbytes, offset=storage.offset))
    return SharedTensors(manifest, [(entry, _view(entry, bases)) for entry in manifest.tensors], mapping)


def _view(entry: TensorEntry, bases: list[torch.Tensor]) -> torch.Tensor:
    dtype = _DTYPES[entry.dtype]
    if entry.storage < 0:
        return torch.empty_strided(entry.shape, entry.stride, dtype=dtype, device=bases[0].device if bases else "cpu")
    return bases[entry.storage].view(dtype).as_strided(entry.shape, entry.stride, entry.offset)


def attach_cuda(manifest: Manifest) -> SharedTensors:
    """Tensors over the holder's CUDA memory, opened from its IPC handles."""
    if not torch.cuda.is_available():
        raise AttachError(f"the holder exports CUDA weights ({manifest.device}), but this process has no CUDA")
    device = torch.device(manifest.device)
    if device.index is not None:
        torch.cuda.set_device(device)
    storages = []
    for storage in manifest.storages:
        if storage.ipc is None:
            raise AttachError("a CUDA manifest entry has no IPC handle")
        storages.append(torch.UntypedStorage._new_shared_cuda(*storage.ipc))
    tensors = []
    for entry in manifest.tensors:
        dtype = _DTYPES[entry.dtype]
        if entry.storage < 0:
            tensor = torch.empty_strided(entry.shape, entry.stride, dtype=dtype, device=device)
        else:
            tensor = torch.empty(0, dtype=dtype, device=device).set_(
                storages[entry.storage], entry.offset, entry.shape, entry.stride
            )
        tensors.append((entry, tensor))
    return SharedTensors(manifest, tensors)


# 4. The model around them -------------------------------------------------------------------------------


def build_on_meta(spec: ModelSpec) -> nn.Module:
    """The model's modules with every tensor on the `meta` device (no memory), configured as
    `loader.load_model` configures it, with the generation config `from_pretrained` would load."""
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    config = transformers.AutoConfig.from_pretrained(spec.path, local_files_only=True)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(spec.dtype)}
    if "attn_implementation" in spec.options:
        kwargs["attn_implementation"] = str(spec.options["attn_implementation"])
    auto = transformers.AutoModelForSeq2SeqLM if spec.kind == "seq2seq" else transformers.AutoModel
    with torch.device("meta"):
        model: Any = auto.from_config(config, **kwargs)  # type: ignore[no-untyped-call]
    if model.can_generate():
        model.generation_config = _generation_config(spec.path)
    model.eval().requires_grad_(False)
    return model  # type: ignore[no-any-return]


def _generation_config(path: Path) -> Any:
    """As `from_pretrained` does: generation_config.json, else one derived from config.json."""
    try:
        return transformers.GenerationConfig.from_pretrained(path, local_files_only=True)
    except OSError:
        return transformers.GenerationConfig.from_pretrained(
            path, config_file_name="config.json", _from_model_config=True, local_files_only=True
        )


def assign(model: nn.Module, shared: SharedTensors) -> None:
    """Put the shared tensors in place of the meta ones. Every name of a tied tensor gets the same
    Parameter object, so ties survive; anything left on meta is an error naming it."""
    for entry, tensor in shared.tensors:
        value: torch.Tensor = nn.Parameter(tensor, requires_grad=False) if entry.is_param else tensor
        for name in entry.names:
            owner_name, _, leaf = name.rpartition(".")
            try:
                owner = model.get_submodule(owner_name)
            except AttributeError as exc:
                raise AttachError(f"the holder's tensor {name!r} has no module here: {exc}") from exc
            slots: dict[str, Any] = owner._parameters if entry.is_param else owner._buffers
            if leaf not in slots:
                kind = "parameter" if entry.is_param else "buffer"
                raise AttachError(f"the holder's {kind} {name!r} does not exist in the model built here")
            slots[leaf] = value
    left = [name for name, t in itertools.chain(_weights(model), _plain_tensors(model)) if t.is_meta]
    if left:
        raise AttachError(f"{len(left)} tensors have no shared value (model files differ?): {left[:5]}")


def _weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _plain_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors kept as plain module attributes (neither parameter nor buffer)."""
    for module_name, module in model.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor):
                yield f"{module_name}.{attr}", value


def protect(model: nn.Module) -> bool:
    """Make every parameter and buffer refuse mutable access (see the module docstring). False
    when this torch has no such switch (then only the mapping's PROT_READ guards CPU weights)."""
    switch = getattr(torch._C, "_set_throw_on_mutable_data_ptr", None)
    if switch is None:
        logger.warning("[weights] torch %s cannot mark storages read-only; writes are not trapped", torch.__version__)
        return False
    for _, tensor in _weights(model):
        switch(tensor)
    return True


@dataclass
class AttachedModel:
    """A model whose weights live in the holder's shared memory."""

    model: nn.Module
    shared: SharedTensors
    guarded: bool

    def release(self) -> None:
        """Drop this process's references; the mapping goes with the last tensor over it."""
        mapping = self.shared.mapping
        self.shared.tensors.clear()
        self.shared.mapping = None
        del self.model
        gc.collect()
        if mapping is not None:
            with contextlib.suppress(BufferError):  # a tensor still referenced elsewhere keeps it
                mapping.close()


def attach_model(spec: ModelSpec, manifest: Manifest, fds: list[int], *, guard: bool = True) -> AttachedModel:
    """Build `spec`'s model on meta and attach the holder's tensors; closes `fds`."""
    try:
        manifest.check_for(spec)
        if manifest.device == "cpu":
            if len(fds) != 1:
                raise AttachError(f"a CPU manifest comes with one shared file, not {len(fds)} descriptors")
            shared = attach_cpu(manifest, fds[0])
        else:
            shared = attach_cuda(manifest)
    finally:
        for fd in fds:
            os.close(fd)
    model = build_on_meta(spec)
    assign(model, shared)
    guarded = protect(model) if guard else False
    return AttachedModel(model, shared, guarded)


def mapped_weight_files() -> int:
    """How many shared weight files this process has mapped (for checking that a reattach let the
    previous copy go)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return -1
    return len({line.split()[-1] for line in lines if "memfd:ectrans-weights-" in line})


# 5. Specs across processes ------------------------------------------------------------------------------


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
