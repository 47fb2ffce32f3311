"""Token counts per input, as the model's own tokenizer sees them: OpenAI's `usage`, and refusing
over-long inputs (unless `truncate`) before they are queued, as TEI does.

Only the tokenizer is loaded (from `tokenizer.json` with the `tokenizers` library, else with
transformers), never the model; the first request for a model loads it on a thread."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence

from ectrans.common.registry import ModelSpec

logger = logging.getLogger(__name__)

Counter = Callable[[Sequence[str]], list[int]]
INLINE_MAX = 8  # inputs counted on the event loop; more go to a thread (a long list can take milliseconds)


def _words(texts: Sequence[str]) -> list[int]:
    """The no-op model's own count (see ectrans/models/noop.py)."""
    return [len(text.split()) for text in texts]


def load_counter(spec: ModelSpec) -> Counter:
    """A function counting tokens with special tokens, untruncated (slow: call from a thread)."""
    if spec.kind == "noop":
        return _words
    tokenizer_json = spec.path / "tokenizer.json"
    if tokenizer_json.exists():
        from tokenizers import Tokenizer

        fast = Tokenizer.from_file(str(tokenizer_json))
        fast.no_padding()
        fast.no_truncation()
        return lambda texts: [len(e.ids) for e in fast.encode_batch(list(texts))]
    from transformers import AutoTokenizer

    slow = AutoTokenizer.from_pretrained(spec.path, local_files_only=True)
    lock = threading.Lock()  # a transformers tokenizer resets its backend's settings on every call

    def count(texts: Sequence[str]) -> list[int]:
        with lock:
            return [len(ids) for ids in slow(list(texts))["input_ids"]]

    return count


class TokenCounter:
    """One counter per model, loaded on first use."""

    def __init__(self, registry: dict[str, ModelSpec]) -> None:
        self.registry = registry
        self._counters: dict[str, Counter] = {}
        self._lock = asyncio.Lock()

    async def count(self, model: str, texts: Sequence[str]) -> list[int] | None:
        """Token counts, or None for a model this gateway's registry does not know."""
        spec = self.registry.get(model)
        if spec is None:
            return None
        counter = self._counters.get(model)
        if counter is None:
            async with self._lock:
                if model not in self._counters:
                    self._counters[model] = await asyncio.to_thread(load_counter, spec)
                counter = self._counters[model]
        if len(texts) <= INLINE_MAX:
            return counter(texts)
        return await asyncio.to_thread(counter, texts)
