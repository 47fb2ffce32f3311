"""What sharing weights across processes needs of CUDA: a zygote may fork only before the CUDA
driver is loaded, and the holder's allocations must be exportable through CUDA IPC."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def cuda_driver_loaded(maps: str | None = None) -> bool:
    """Whether this process has loaded the CUDA driver library (`/proc/self/maps`, or `maps`).

    `torch.cuda.is_initialized()` only knows torch's own lazy init; `torch.cuda.device_count()` and
    other runtime calls load and initialise the driver without it, and a driver initialised before
    fork cannot be used by the children.
    """
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return False
    return any(Path(line.split()[-1]).name.startswith("libcuda.so") for line in maps.splitlines() if "/" in line)


ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def _expandable(option: str) -> bool:
    key, _, value = option.partition(":")
    return key.strip() == "expandable_segments" and value.strip().lower() in ("true", "1")


def ipc_allocator_problem(environ: Mapping[str, str] | None = None) -> str | None:
    """Why the CUDA allocator settings in `environ` would break exporting weights, or None.

    Memory of expandable segments is not cudaMalloc memory: torch exports it as a file descriptor
    fetched with pidfd_getfd (refused in unprivileged containers), and each importer reserves
    address space about the size of the GPU per imported handle (one per storage here), so the
    holder allocates its weights from classic segments.
    """
    environ = os.environ if environ is None else environ
    for name in ALLOC_CONF_VARS:
        if any(_expandable(option) for option in environ.get(name, "").split(",")):
            return f"{name}={environ[name]!r} turns on expandable_segments, which CUDA IPC weight sharing cannot export"
    return None


def without_expandable_segments(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with expandable_segments dropped from the allocator settings (for the holder;
    executors keep them for their own activations: importing a classic handle works either way)."""
    cleaned = dict(environ)
    for name in ALLOC_CONF_VARS:
        if name in cleaned:
            kept = [option for option in cleaned[name].split(",") if option.strip() and not _expandable(option)]
            if kept:
                cleaned[name] = ",".join(kept)
            else:
                del cleaned[name]
    return cleaned
