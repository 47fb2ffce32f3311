"""Data files shipped with the package: the benchmark sentences and the Compose schema."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DATA = Path(__file__).resolve().parent


def data_dir() -> Path:
    """`$ECTRANS_DATA_DIR` when set, else the files shipped in this package."""
    configured = os.environ.get("ECTRANS_DATA_DIR")
    return Path(configured) if configured else PACKAGE_DATA


def data_file(name: str) -> Path:
    """One data file; a clear error naming the folder when it is missing."""
    path = data_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"no {name} under {data_dir()} (ECTRANS_DATA_DIR overrides the packaged data)")
    return path
