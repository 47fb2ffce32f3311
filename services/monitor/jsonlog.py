"""Reports as JSON lines, one object per interval, for log shippers (`ECTRANS_MONITOR_JSON`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import IO, Any


class JsonLines:
    """Writes to `stdout`, `stderr`, or appends to a file (created with its folder if needed)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._own = target not in ("stdout", "stderr")
        self._file: IO[str] | None = None
        if self._own:
            path = Path(target).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8", buffering=1)  # line-buffered: whole lines for tailers

    def _stream(self) -> IO[str]:
        if self._file is not None:
            return self._file
        return sys.stdout if self.target == "stdout" else sys.stderr

    def write(self, report: dict[str, Any]) -> None:
        stream = self._stream()
        stream.write(json.dumps(report, separators=(",", ":"), ensure_ascii=False) + "\n")
        stream.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
