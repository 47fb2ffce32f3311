"""The weight holder's server: hands each executor the manifest over a Unix socket and watches it.

An executor connects, sends `{"op": "attach", "pid": ...}`, and receives one frame: the manifest
(msgpack) with, on CPU, the sealed memfd as an SCM_RIGHTS descriptor. It keeps the connection
open: the holder logs who is attached, an executor sees the holder go as end of stream, and a
byte the executor sends comes straight back (a fence: the holder was alive after that moment).
Only processes of the holder's own user may connect (SO_PEERCRED).

Imports neither torch nor numpy. The CPU holder, once it has exported, replaces itself with
`python -m ectrans.sharing.weight_server` (exec, same pid): it then keeps only the shared file's
descriptor and a few MiB of interpreter, not the hundreds of MiB torch costs a process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import selectors
import signal
import socket
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from ectrans.sharing.ipc import read_exact, recv_frame, send_frame, write_frame

logger = logging.getLogger(__name__)

# (request) -> (manifest payload, descriptors to pass)
Provide = Callable[[dict[str, Any]], tuple[bytes, list[int]]]
REQUEST_TIMEOUT_S = 10.0
_UCRED = struct.Struct("3i")


def bind(path: Path) -> socket.socket:
    """A listening Unix socket at `path` (replacing a stale one), readable only by this user."""
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(64)
    return listener


def serve(listener: socket.socket, provide: Provide, control_fd: int) -> None:
    """Answer attach requests until `control_fd` (the supervisor's pipe) reaches end of file."""
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(control_fd, selectors.EVENT_READ, "control")
    attached: dict[socket.socket, int] = {}
    while True:
        for key, _ in selector.select():
            if key.data == "control":
                if not os.read(control_fd, 4096):
                    logger.info("[weights] supervisor gone; holder exits (%d attached)", len(attached))
                    for conn in attached:  # executors see the end of stream now, not at our exit
                        conn.close()
                    return
            elif key.data == "accept":
                conn, _ = listener.accept()
                pid = _answer(conn, provide)
                if pid is None:
                    conn.close()
                else:
                    attached[conn] = pid
                    selector.register(conn, selectors.EVENT_READ, "client")
            else:
                client = key.fileobj
                assert isinstance(client, socket.socket)
                if not _echo(client):
                    selector.unregister(client)
                    logger.info("[weights] executor pid %d detached", attached.pop(client, -1))
                    client.close()


def _echo(client: socket.socket) -> bool:
    """Answer an attached executor's fence bytes, one for one (see `executor_process.HolderLink`);
    False once it has gone."""
    try:
        data = client.recv(4096)
        if data:
            client.sendall(data)
    except OSError:
        return False
    return bool(data)


def _answer(conn: socket.socket, provide: Provide) -> int | None:
    """Send the manifest to a new connection; its pid, or None when refused."""
    try:
        conn.settimeout(REQUEST_TIMEOUT_S)
        _pid, uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        if uid != os.getuid():
            logger.warning("[weights] refused a connection from uid %d", uid)
            return None
        frame = recv_frame(conn, max_fds=0)
        if frame is None:
            return None
        request = msgpack.unpackb(frame[0], raw=False)
        if not isinstance(request, dict) or request.get("op") != "attach":
            logger.warning("[weights] refused a request that is not an attach: %r", request)
            return None
        payload, fds = provide(request)
        send_frame(conn, payload, fds)
        conn.settimeout(None)
    except (OSError, ValueError, msgpack.UnpackException) as exc:
        logger.warning("[weights] attach request failed: %s", exc)
        return None
    pid = int(request.get("pid", -1))
    logger.info("[weights] executor pid %d attached", pid)
    return pid


def main(argv: list[str] | None = None) -> int:
    """The CPU holder after exec: serve a manifest and the sealed memfd it describes."""
    parser = argparse.ArgumentParser(prog="python -m ectrans.sharing.weight_server")
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--weights-fd", type=int, required=True)
    parser.add_argument("--manifest-fd", type=int, required=True)
    parser.add_argument("--report-fd", type=int, required=True)
    parser.add_argument("--ready", required=True, help="JSON: what the holder reports when ready")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when the holder stops
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s worker.holder %(levelname)s %(message)s"
    )
    size = os.fstat(args.manifest_fd).st_size
    os.lseek(args.manifest_fd, 0, os.SEEK_SET)
    manifest = read_exact(args.manifest_fd, size) if size else b""
    os.close(args.manifest_fd)
    if not manifest:
        raise SystemExit("the holder handed over an empty manifest")
    listener = bind(args.socket)
    ready: dict[str, Any] = json.loads(args.ready) | {"ev": "ready", "socket": str(args.socket), "pid": os.getpid()}
    write_frame(args.report_fd, msgpack.packb(ready, use_bin_type=True))
    serve(listener, lambda _request: (manifest, [args.weights_fd]), control_fd=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
