"""`python -m ectrans.services.gateway`: serve the HTTP API on uvicorn (uvloop, httptools)."""

from __future__ import annotations

import logging
import signal
import socket
import sys
from types import FrameType

import uvicorn

from ectrans.common.lifecycle import run_main
from ectrans.common.logs import setup_logging
from ectrans.common.registry import load_registry
from ectrans.services.gateway.app import create_app
from ectrans.services.gateway.http_protocol import http_protocol, quiet_parser_warnings
from ectrans.services.gateway.settings import GatewaySettings, http_url, instance_name

logger = logging.getLogger(__name__)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    """uvicorn stops gracefully on SIGTERM and then raises the signal again: end with status 0."""
    raise SystemExit(0)


def main() -> int:
    settings = GatewaySettings()
    setup_logging(settings.log_level, settings.log_format, "gateway")
    quiet_parser_warnings()
    registry = load_registry(settings.models_file, settings.models_json)
    family = socket.AF_INET6 if ":" in settings.gateway_host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.gateway_host, settings.gateway_port))  # port 0: a free one, named in the instance
        # Listen now: SO_REUSEADDR lets a bind succeed beside another process's socket, and a listen
        # failing later, inside the server, left a gateway that reported ready and served nobody.
        sock.listen(2048)
    except OSError as exc:
        logger.error("[start] cannot listen on %s:%d: %s", settings.gateway_host, settings.gateway_port, exc)
        return 1
    port = sock.getsockname()[1]
    address = http_url(settings.gateway_host, port)
    app = create_app(settings, registry, instance=instance_name(port), address=address)
    config = uvicorn.Config(
        app,
        loop="none",  # run_main already runs uvloop
        # httptools, with its parser's 400s in the API's error shape and a deadline for headers
        http=http_protocol(settings.gateway_body_timeout_s),
        ws="none",  # no WebSocket route: an Upgrade is ignored and the request served as HTTP (http_protocol.py)
        lifespan="on",
        access_log=False,  # quiet: no line per request (the metrics count them)
        log_config=None,  # uvicorn's loggers go through ours
        log_level="debug" if settings.log_level == "DEBUG" else "warning",  # its start lines repeat ours
        timeout_graceful_shutdown=int(settings.gateway_timeout_s),
        server_header=False,
        proxy_headers=False,  # nothing here reads the client's address: X-Forwarded-* parsing is waste
    )
    server = uvicorn.Server(config)
    signal.signal(signal.SIGTERM, _exit_cleanly)
    return run_main(lambda: server.serve(sockets=[sock]))


if __name__ == "__main__":
    sys.exit(main())
