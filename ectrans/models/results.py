"""The conversion of segment outputs into what `ItemResult.output` carries."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def to_python(outputs: list[Any]) -> list[Any]:
    """Tensors become numpy arrays (float32 for floating point), containers are converted inside.

    Same-shaped tensors (one row per input) are stacked and copied off the device in one transfer.
    """
    if outputs and all(isinstance(o, torch.Tensor) for o in outputs):
        shapes = {tuple(o.shape) for o in outputs}
        if len(shapes) == 1:
            return list(_to_numpy(torch.stack(outputs)))
    return [_convert(output) for output in outputs]


def _convert(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _to_numpy(value)
    if isinstance(value, dict):
        return {key: _convert(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_convert(item) for item in value)
    return value


def _to_numpy(tensor: torch.Tensor) -> np.ndarray[Any, Any]:
    if tensor.is_floating_point():
        tensor = tensor.float()
    return tensor.detach().cpu().numpy()
