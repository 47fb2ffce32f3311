"""Device, dtype and CPU thread choices, with clear errors where a host cannot honour them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class DeviceError(RuntimeError):
    """A device or dtype this host cannot provide; the message says what to change."""


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA on a host without it is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {name!r} asked for, but this torch build or host has no CUDA "
                f"(torch {torch.__version__}); use device 'cpu' or 'auto'"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist")
    elif device.type != "cpu":
        raise DeviceError(f"device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise DeviceError(f"dtype {name!r} must be one of {sorted(DTYPES)}") from None


def device_label(device: torch.device) -> str:
    """A stable, file-name-safe name for a device: `cpu`, or `cuda-<gpu name>`."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return "cuda-" + "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()


def set_cpu_threads(threads: int | None) -> None:
    """Set torch's intra-op thread count for the calling thread (and threads started after it).

    torch keeps the OpenMP count per thread, so each pipeline stage calls this from its own thread.
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"{threads=} must be at least 1")
        torch.set_num_threads(threads)


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
