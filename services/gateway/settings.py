"""Gateway settings (`ECTRANS_GATEWAY_*` and the common `ECTRANS_*`)."""

from __future__ import annotations

import ipaddress
import json
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from ectrans.common.heartbeat import host_name
from ectrans.common.settings import CommonSettings


def instance_name(port: int) -> str:
    """The gateway's instance (heartbeat and client names): `<host>-<port>`, whatever ECTRANS_INSTANCE
    says, so that several gateways on one host never share one."""
    return f"{host_name()}-{port}"


def http_url(host: str, port: int) -> str:
    """`http://host:port`, an IPv6 address in brackets."""
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (`localhost`, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class GatewaySettings(CommonSettings):
    gateway_host: str = Field("127.0.0.1", description="Address the HTTP gateway listens on.")
    gateway_port: int = Field(8000, ge=0, le=65535, description="Port the HTTP gateway listens on (0: a free one).")
    gateway_api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Bearer keys the gateway accepts (a JSON list, or comma-separated); none means no check, which is allowed"
            " only on a loopback address."
        ),
    )
    gateway_max_body_bytes: int = Field(
        2 * 1024 * 1024, ge=1024, description="Largest request body the gateway reads; larger ones get 413."
    )
    gateway_max_inputs: int = Field(2048, ge=1, description="Most inputs one request may carry (OpenAI allows 2048).")
    gateway_max_concurrent_requests: int = Field(
        4096,
        ge=1,
        description="Requests the gateway holds at once; one more is answered 429 `overloaded` at once (TEI's"
        " max_concurrent_requests). Queues shed load by their own bounds; this one keeps a flood of open"
        " requests from growing the gateway without end.",
    )
    gateway_timeout_s: float = Field(60.0, gt=0, description="How long a request waits for its results before 504.")
    gateway_body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="How long a request's headers, then its body, may take to arrive (slow or stalled clients):"
        " then the connection is closed, or the request answered 408.",
    )
    gateway_default_model: str = Field("minilm", description="Model for requests that name none (TEI's /embed).")
    heartbeat_s: float = Field(2.0, gt=0, description="The gateway's heartbeat, for `ectrans health gateway`.")

    @field_validator("gateway_api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        """`ECTRANS_GATEWAY_API_KEYS=k1,k2` as well as a JSON list. Keys are stripped, as the header's key
        is, and empty ones dropped in both forms: an empty key would admit a bare `Authorization: Bearer`."""
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else text.split(",")
        if isinstance(value, list):
            return [
                key.strip() if isinstance(key, str) else key for key in value if not isinstance(key, str) or key.strip()
            ]
        return value

    @model_validator(mode="after")
    def _keys_off_loopback(self) -> GatewaySettings:
        if not self.gateway_api_keys and not is_loopback(self.gateway_host):
            raise ValueError(
                f"{self.gateway_host=} is reachable from other machines: set ECTRANS_GATEWAY_API_KEYS"
                " (bearer keys clients must send), or listen on 127.0.0.1"
            )
        return self
