"""The model layer: loading, segmenting and running Transformer models. Never imports redis."""

from ectrans.models.api import Executor, ItemResult, Request

__all__ = ["Executor", "ItemResult", "Request"]
