"""What a `translate`/`generate` request may ask of generation, and the per-model limits on it.

No torch here: the dispatcher can check a task's params with this module before any model loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class GenerationLimits:
    """Defaults and hard caps for what a request may ask."""

    default_num_beams: int = 1
    max_num_beams: int = 8
    default_max_new_tokens: int = 64
    max_new_tokens: int = 256

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> GenerationLimits:
        """Limits from a registry entry's extra keys (same names as the fields), defaults elsewhere. A cap
        given below a default not given lowers that default (`max_new_tokens = 40` alone: 40 by default)."""
        names = ("default_num_beams", "max_num_beams", "default_max_new_tokens", "max_new_tokens")
        given = {name: options[name] for name in names if name in options}
        for name, value in given.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"model option {name} must be an integer, not {value!r}")
        base = cls()
        for default, cap in (("default_num_beams", "max_num_beams"), ("default_max_new_tokens", "max_new_tokens")):
            if cap in given and default not in given:
                given[default] = min(getattr(base, default), given[cap])
        return cls(**given)

    def within_positions(self, positions: int | None) -> GenerationLimits:
        """These limits with max_new_tokens below a decoder's position table of `positions` rows (the
        start token takes one); None: a decoder without one (relative positions, as T5's)."""
        if positions is None or self.max_new_tokens < positions:
            return self
        cap = positions - 1
        return replace(self, max_new_tokens=cap, default_max_new_tokens=min(self.default_max_new_tokens, cap))

    def __post_init__(self) -> None:
        if not 1 <= self.default_num_beams <= self.max_num_beams:
            raise ValueError(f"{self.default_num_beams=} must be between 1 and {self.max_num_beams=}")
        if not 1 <= self.default_max_new_tokens <= self.max_new_tokens:
            raise ValueError(f"{self.default_max_new_tokens=} must be between 1 and {self.max_new_tokens=}")


@dataclass(frozen=True)
class GenerationParams:
    num_beams: int
    max_new_tokens: int


def parse_generation_params(params: Mapping[str, Any], limits: GenerationLimits) -> GenerationParams:
    """`num_beams` and `max_new_tokens` from a request's params (ints, or decimal strings as redis-cli
    sends them); other keys are not generation's business and are ignored."""
    return GenerationParams(
        num_beams=_bounded_int(params, "num_beams", limits.default_num_beams, limits.max_num_beams),
        max_new_tokens=_bounded_int(params, "max_new_tokens", limits.default_max_new_tokens, limits.max_new_tokens),
    )


def _bounded_int(params: Mapping[str, Any], key: str, default: int, cap: int) -> int:
    raw = params.get(key, default)
    if isinstance(raw, str) and raw.strip().isdecimal():
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= cap:
        raise ValueError(f"{key} must be an integer from 1 to {cap}, not {raw!r}")
    return raw
