"""Device, dtype and CPU thread choices, with clear errors where a host cannot honour them."""

from __future__ import annotations

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
    But a thread's first parallel operation (or `get_num_threads`) sets its count once to the one
    set last anywhere in the process: that happens here first, or a stage set to 2 threads would run
    on the 1 that a tokenising stage, started after it, set for itself (and MKL's GEMMs with it).
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"{threads=} must be at least 1")
        torch.get_num_threads()  # the calling thread's one-time reset, before its own count
        torch.set_num_threads(threads)
