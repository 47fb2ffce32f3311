"""The pooling a sentence-transformers model directory declares. Torch-free: the gateway's `/info`
reports it, and the encoder builds its `Pooling` from it."""

from __future__ import annotations

import json
from pathlib import Path

POOLING_MODES = ("mean", "cls", "max")


def declared_pooling(model_dir: Path) -> tuple[str, bool]:
    """The pooling mode and whether vectors are L2-normalised; mean + normalise for a plain model."""
    modules_file = model_dir / "modules.json"
    if not modules_file.exists():
        return "mean", True
    modules = json.loads(modules_file.read_text())
    types = {str(module.get("type", "")).rsplit(".", 1)[-1]: module for module in modules}
    mode = "mean"
    if "Pooling" in types:
        config_file = model_dir / types["Pooling"].get("path", "") / "config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        for candidate in POOLING_MODES:
            if config.get(f"pooling_mode_{candidate}_token") or config.get(f"pooling_mode_{candidate}_tokens"):
                mode = candidate
                break
        declared = config.get("pooling_mode")  # the newer single-field form
        if isinstance(declared, str):
            mode = declared
    return mode, "Normalize" in types
