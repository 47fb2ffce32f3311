"""Settings every service shares, read from `ECTRANS_*` environment variables (and `.env`).

Each service has its own settings class deriving from `CommonSettings`; read them once in `main()`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ectrans.common.keys import Keys

ENV_PREFIX = "ECTRANS_"


class CommonSettings(BaseSettings):
    """Connection, naming and logging: what every ECTrans process needs."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", extra="ignore")

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description=(
            "Redis to use; `redis://`, `rediss://` (TLS), user:password for ACL auth; `redis+cluster://h1:p1,h2:p2`"
            " for a Redis Cluster; `redis+sentinel://s1:p1/master-name` for Sentinel (docs/scaling.md)."
        ),
    )
    prefix: str = Field("ectrans:", description="Prefix of every Redis key ECTrans writes.")
    host: str | None = Field(
        None, description="This machine's name in heartbeats and consumer names; default: the host name."
    )
    cache_dir: Path | None = Field(None, description="Where model profiles are stored; default ~/.cache/ectrans.")
    models_file: Path | None = Field(
        None, description="TOML file of extra models (see README); the packaged MiniLM is always known."
    )
    models_json: str | None = Field(
        None, description="Extra models as inline JSON (`ECTRANS_MODELS_JSON`), same shape as the TOML file."
    )
    result_ttl_s: int = Field(3600, ge=1, description="How long a task's result hash is kept.")
    max_deliveries: int = Field(
        3,
        ge=1,
        description="Deliveries of a task, to dispatchers (ingress) or to workers (its model queue), after which it "
        "is dead-lettered: one setting for both, so a `.env` line means the same thing to every service.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    @field_validator("prefix")
    @classmethod
    def _prefix_is_clean(cls, value: str) -> str:
        if not value or any(c in value for c in " {}\n\t"):
            raise ValueError(f"{value=} must be non-empty without spaces or braces")
        return value

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)
