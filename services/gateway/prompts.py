"""TEI's `prompt_name`: a prompt the model's sentence-transformers configuration declares
(`config_sentence_transformers.json`: `"prompts": {"query": "query: ", ...}`), put before each input
text, as sentence-transformers and TEI do."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from ectrans.common.registry import ModelSpec
from ectrans.services.gateway.errors import bad_request

CONFIG_FILE = "config_sentence_transformers.json"


@functools.cache
def declared_prompts(model_dir: Path) -> dict[str, str]:
    """The prompts of the model directory, read once (none where it declares none or cannot be read)."""
    try:
        config = json.loads((model_dir / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return {}
    prompts = config.get("prompts") if isinstance(config, dict) else None
    if not isinstance(prompts, dict):
        return {}
    return {str(name): text for name, text in prompts.items() if isinstance(text, str)}


def prompt_text(prompt_name: str | None, spec: ModelSpec | None, model: str) -> str | None:
    """The text `prompt_name` stands for in `model`; None without one; a 400 for a name it does not declare."""
    if prompt_name is None:
        return None
    prompts = declared_prompts(spec.path) if spec is not None and spec.kind == "encoder" else {}
    if prompt_name not in prompts:
        known = ", ".join(repr(name) for name in sorted(prompts)) or "none"
        message = f"prompt_name {prompt_name[:40]!r} is not a prompt of model {model[:100]!r} (its prompts: {known})"
        raise bad_request(message[:400], "prompt_name")
    return prompts[prompt_name]
