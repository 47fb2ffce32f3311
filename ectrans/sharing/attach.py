"""Attach (an executor): the model is built on the `meta` device from its config, then every
parameter and buffer is replaced by a tensor over the holder's shared memory (`torch.frombuffer`
over a read-only mapping on CPU, `UntypedStorage._new_shared_cuda` on CUDA; see `export.py` for
how the holder made it). Nothing is copied.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from ectrans.common.registry import ModelSpec
from ectrans.models.device import resolve_dtype
from ectrans.sharing.manifest import DTYPES, AttachError, Manifest, TensorEntry, advise_huge_pages

logger = logging.getLogger(__name__)

_READONLY_WARNING = "The given buffer is not writable"


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
    advise_huge_pages(mapping)
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
    dtype = DTYPES[entry.dtype]
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
        dtype = DTYPES[entry.dtype]
        if entry.storage < 0:
            tensor = torch.empty_strided(entry.shape, entry.stride, dtype=dtype, device=device)
        else:
            tensor = torch.empty(0, dtype=dtype, device=device).set_(
                storages[entry.storage], entry.offset, entry.shape, entry.stride
            )
        tensors.append((entry, tensor))
    return SharedTensors(manifest, tensors)


# The model around them -------------------------------------------------------------------------------


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
