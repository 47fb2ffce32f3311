"""Per-input checks, and the no-op op's answer: plain Python, so the no-op path needs no torch."""

from __future__ import annotations


def input_error(text: object) -> str | None:
    """Why one input cannot run (it becomes that input's error, not the batch's), or None."""
    if not isinstance(text, str):
        return f"input must be a string, not {type(text).__name__}"
    if not text.strip():
        return "empty input"
    return None


def noop_output(text: object) -> dict[str, int]:
    return {"chars": len(text) if isinstance(text, str) else 0}
