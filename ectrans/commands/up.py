"""`ectrans up`: the whole stack on this machine — Redis (unless ECTRANS_REDIS_URL is set), the
dispatcher, one worker, the monitor and the HTTP gateway as child processes, restarted if they die,
stopped cleanly on Ctrl-C/SIGTERM/SIGHUP, and tied to it: they get SIGTERM if it is killed."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import socket
import sys
import time
from pathlib import Path
from types import FrameType

from pydantic import ValidationError

from ectrans.common.heartbeat import host_name
from ectrans.common.keys import Keys
from ectrans.common.redis_conn import redact
from ectrans.common.registry import RegistryError, load_registry
from ectrans.common.settings import CommonSettings
from ectrans.local import stacks
from ectrans.local.launch import ServiceProcess, restart_dead, stop_all
from ectrans.local.redis_server import RedisServer, find_redis_binary

SERVICES = ("dispatcher", "worker", "monitor", "gateway")
STOP_GRACE_S = 25.0
GATEWAY_DEFAULT = "127.0.0.1:8000"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=0, help="port of the private Redis (default: a free one)")
    parser.add_argument("--aof", action="store_true", help="turn Redis persistence (AOF) on")
    parser.add_argument("--data-dir", default=None, help="where the private Redis keeps its files")
    parser.add_argument(
        "--workers", type=_worker_count, default=1, help="worker processes to start (0: workers run elsewhere)"
    )
    parser.add_argument(
        "--name",
        type=_stack_name,
        default=None,
        help="this stack's name on this machine (default: $ECTRANS_STACK, else 'default'); "
        "other commands find it with ECTRANS_STACK=<name>",
    )
    parser.add_argument("--models-file", help="TOML file of models to add (sets ECTRANS_MODELS_FILE)")
    parser.add_argument("--serve", help="models the workers serve, comma-separated or '*' (ECTRANS_SERVE_MODELS)")
    parser.add_argument(
        "--gateway",
        default=GATEWAY_DEFAULT,
        metavar="HOST:PORT",
        help=f"where the HTTP gateway listens (default {GATEWAY_DEFAULT}, or a free port if that one is taken)",
    )
    parser.add_argument("--no-gateway", action="store_true", help="do not start the HTTP gateway")


class PortTaken(OSError):
    """The port asked for is bound by another socket, and no other will do."""


def gateway_address(spec: str, held: list[socket.socket]) -> tuple[str, int]:
    """HOST:PORT to listen on; the default port, when taken, gives way to a free one (held: see
    `hold_port`)."""
    from ectrans.services.gateway.settings import GatewaySettings, is_loopback

    host, _, port_text = spec.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port_text.isdigit():
        raise SystemExit(f"[up] --gateway wants HOST:PORT, got {spec!r}")
    port = int(port_text)
    try:  # the keys as the gateway reads them: blank ones are none (it would refuse to start, and restart)
        keys = GatewaySettings(gateway_host="127.0.0.1", gateway_port=0).gateway_api_keys
    except ValidationError as exc:
        raise SystemExit(f"[up] {exc}") from None
    if not is_loopback(host) and not keys:
        raise SystemExit(f"[up] the gateway on {host} is reachable from other machines: set ECTRANS_GATEWAY_API_KEYS")
    try:
        return host, hold_port(host, port, held, or_free=spec == GATEWAY_DEFAULT)
    except PortTaken:
        raise SystemExit(f"[up] cannot listen on {spec} for the gateway: the port is taken") from None
    except (OSError, OverflowError) as exc:  # an address not of this machine, a port past 65535
        raise SystemExit(f"[up] cannot listen on {spec} for the gateway: {exc}") from None


def hold_port(host: str, port: int, held: list[socket.socket], *, or_free: bool = True) -> int:
    """`port` (0: any free one) if nothing else has it at `host`, else a free one when `or_free`;
    bound here, not listening, and kept in `held` while `up` runs. Another `up` starting at the same
    moment then finds it taken, instead of choosing it too (two gateways on one port: one listens, the
    other serves nobody). The child still listens on it: both sockets set SO_REUSEADDR (this one after
    its bind, which is what makes the bind a test), and only one listens."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            if not or_free:
                raise PortTaken(exc.errno, exc.strerror) from None
            probe.bind((host, 0))
    except BaseException:
        probe.close()
        raise
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    held.append(probe)
    return int(probe.getsockname()[1])


def metrics_address(held: list[socket.socket]) -> tuple[str, int] | None:
    """Where the monitor serves /metrics (None: turned off). Its default port, when taken (another
    stack on this machine), gives way to a free one, as the gateway's does; a port set by
    ECTRANS_METRICS_PORT is kept, taken or not."""
    from ectrans.services.monitor.settings import MonitorSettings

    try:
        settings = MonitorSettings()
    except ValidationError as exc:
        raise SystemExit(f"[up] {exc}") from None
    if not settings.metrics_port:
        return None
    if "metrics_port" in settings.model_fields_set:
        return settings.metrics_host, settings.metrics_port
    try:
        return settings.metrics_host, hold_port(settings.metrics_host, settings.metrics_port, held)
    except OSError:  # a host not of this machine: the monitor says it cannot serve /metrics, and runs on
        return settings.metrics_host, settings.metrics_port


def instance_names(name: str, workers: int) -> dict[str, str]:
    """Each service's instance name (its consumer name and heartbeat key), by child name. A named stack
    puts its name in them: two stacks on one Redis and prefix must never share a consumer name, since
    a process that starts takes back the pending entries of its name (those of the other stack's live
    process). ECTRANS_INSTANCE, when set, is the base instead."""
    explicit = os.environ.get("ECTRANS_INSTANCE")
    base = explicit or (host_name() if name == stacks.DEFAULT_NAME else f"{host_name()}-{name}")
    slot = base if explicit else f"{base}-0"
    names = {"dispatcher": slot}
    for index in range(workers):
        names[f"worker-{index}"] = base if explicit and workers == 1 else f"{base}-{index}"
    names["monitor"] = slot
    return names


def _children(
    redis_url: str,
    instances: dict[str, str],
    gateway: tuple[str, int] | None = None,
    metrics: tuple[str, int] | None = None,
) -> list[ServiceProcess]:
    env = {**os.environ, "ECTRANS_REDIS_URL": redis_url}
    children = [
        ServiceProcess(child, child.split("-")[0], {**env, "ECTRANS_INSTANCE": instance}, tied=True)
        for child, instance in instances.items()
    ]
    monitor = next(child for child in children if child.kind == "monitor")
    monitor.env["ECTRANS_METRICS_PORT"] = str(metrics[1]) if metrics else "0"
    if gateway is not None:
        host, port = gateway
        gateway_env = {**env, "ECTRANS_GATEWAY_HOST": host, "ECTRANS_GATEWAY_PORT": str(port)}
        children.append(ServiceProcess("gateway", "gateway", gateway_env, tied=True))
    return children


def heartbeat_keys(prefix: str, children: list[ServiceProcess]) -> list[str]:
    """The heartbeat key each child writes once it runs (the gateway's instance is `<host>-<port>`)."""
    from ectrans.services.gateway.settings import instance_name

    keys = Keys(prefix)

    def instance(child: ServiceProcess) -> str:  # the gateway ignores ECTRANS_INSTANCE, even when set
        if child.kind == "gateway":
            return instance_name(int(child.env["ECTRANS_GATEWAY_PORT"]))
        return child.env["ECTRANS_INSTANCE"]

    return [keys.heartbeat(child.kind, instance(child)) for child in children]


def example_task() -> tuple[str, str]:
    """The model and op the banner's examples name: the first model the workers serve (`*`: minilm
    where the registry has it) and its `embed` op, or its first: `--serve noop` shows commands that work."""
    settings = CommonSettings()
    try:
        registry = load_registry(settings.models_file, settings.models_json)
    except (RegistryError, ValidationError):
        return "minilm", "embed"
    served = os.environ.get("ECTRANS_SERVE_MODELS", "minilm").strip()
    names = sorted(registry) if served == "*" else [name.strip() for name in served.split(",") if name.strip()]
    model = "minilm" if "minilm" in names or not names else names[0]
    spec = registry.get(model)
    if spec is None or "embed" in spec.ops or not spec.ops:
        return model, "embed"
    return model, sorted(spec.ops)[0]


def _http_banner(
    gateway: tuple[str, int] | None, metrics: tuple[str, int] | None = None, task: tuple[str, str] = ("minilm", "embed")
) -> str:
    from ectrans.services.gateway.settings import http_url

    lines = ""
    if gateway is not None:
        base = http_url(*gateway)
        model, op = task
        if op in ("embed", "noop"):  # the gateway answers embeddings for a no-op model too
            body = f"""'{{"model": "{model}", "input": "some text"}}'"""
            lines += f"  HTTP:         curl {base}/v1/embeddings -H 'content-type: application/json' -d {body}\n"
        lines += f"  API docs:     {base}/docs\n"
    if metrics is not None:
        lines += f"  Prometheus:   {http_url(*metrics)}/metrics\n"
    return lines


def _banner(url: str, prefix: str, name: str, task: tuple[str, str] = ("minilm", "embed")) -> str:
    try:
        cli = find_redis_binary("redis-cli")
    except RuntimeError:
        cli = "redis-cli"
    port = url.rsplit(":", 1)[-1].split("/", maxsplit=1)[0]
    rc = f"{cli} -p {port}" if "127.0.0.1" in url else f"{cli} -u {redact(url)}"
    finder = "" if name == stacks.DEFAULT_NAME else f"ECTRANS_STACK={name} "
    model, op = task
    choice = ("" if model == "minilm" else f"--model {model} ") + ("" if op == "embed" else f"--op {op} ")
    return (
        f"ECTrans is starting. Redis: {redact(url)}\n"
        f"  push a task:  {rc} XADD {prefix}tasks '*' model {model} op {op} input 'some text'\n"
        f"  read result:  {rc} HGETALL {prefix}result:<the ID that XADD printed>\n"
        f"  or:           {finder}ectrans submit {choice}'some text'"
        "   (finds this stack, as `ectrans top` and the client do)\n"
        "  stop:         Ctrl-C\n"
    )


def _apply_model_flags(args: argparse.Namespace) -> str | None:
    """Pass --models-file/--serve to every child; check the models file now. An error text, or None."""
    if args.models_file:
        os.environ["ECTRANS_MODELS_FILE"] = str(Path(args.models_file).resolve())
    if args.serve:
        os.environ["ECTRANS_SERVE_MODELS"] = args.serve
    try:
        settings = CommonSettings()
        load_registry(settings.models_file, settings.models_json)
    except (RegistryError, ValidationError) as exc:
        return str(exc)
    return None


def _worker_count(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number, 0 or more (0: workers run elsewhere), got {value!r}")
    return count


def _stack_name(value: str) -> str:
    try:
        return stacks.checked_name(value)
    except stacks.BadStackName as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    if problem := _apply_model_flags(args):
        print(f"ectrans up: {problem}", file=sys.stderr)
        return 2
    name = args.name or stacks.stack_name()
    if (other := stacks.find(name)) is not None:
        print(
            f"ectrans up: the stack {name!r} already runs (pid {other.pid}, {redact(other.redis_url)}); "
            "stop it, or start another with --name <other>",
            file=sys.stderr,
        )
        return 2
    with contextlib.ExitStack() as cleanup:  # undone in reverse, on every way out
        held: list[socket.socket] = []  # the gateway's and the monitor's ports, until `up` ends
        cleanup.callback(_close_all, held)
        gateway = None if args.no_gateway else gateway_address(args.gateway, held)
        metrics = metrics_address(held)
        url = os.environ.get("ECTRANS_REDIS_URL")
        if not url:
            data_dir = Path(args.data_dir) if args.data_dir else None
            server = RedisServer(args.port or None, appendonly=args.aof, data_dir=data_dir, tied=True)
            cleanup.callback(server.cleanup)
            try:
                url = server.start().url
            except (RuntimeError, OSError) as exc:  # --port taken, no redis-server, a --data-dir unusable
                print(f"ectrans up: {exc}", file=sys.stderr)
                return 2
        prefix = os.environ.get("ECTRANS_PREFIX", "ectrans:")
        try:
            stack = stacks.record(name, url, prefix)
        except stacks.StackRunning as exc:  # another `up` of this name started meanwhile
            print(f"ectrans up: {exc}", file=sys.stderr)
            return 2
        cleanup.callback(stacks.remove, stack)
        task = example_task()
        print(_banner(url, prefix, name, task) + _http_banner(gateway, metrics, task), flush=True)
        children = _children(url, instance_names(name, args.workers), gateway, metrics)
        cleanup.callback(stop_all, children, STOP_GRACE_S, _say)
        _serve(children, url, heartbeat_keys(prefix, children))
    return 0


def _close_all(ports: list[socket.socket]) -> None:
    for port in ports:
        port.close()


def _serve(children: list[ServiceProcess], url: str, beats: list[str]) -> None:
    """Start the services and keep them running (restarted if they die) until Ctrl-C, SIGTERM or SIGHUP."""
    stopping = False

    def request_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: its terminal closed
        signal.signal(sig, request_stop)
    for child in children:
        child.start()
    started = time.monotonic()
    announced = False
    while not stopping:
        time.sleep(0.2)
        restart_dead(children, _say)
        if not announced and _all_alive(url, beats):
            announced = True
            print(f"[up] ready in {time.monotonic() - started:.1f}s: all services are heartbeating", flush=True)


def _all_alive(url: str, beats: list[str]) -> bool:
    """True once every started service has written its own heartbeat (not merely as many heartbeats
    as it started: another stack on the same Redis and prefix writes some too)."""
    import redis

    from ectrans.common.redis_conn import connect_sync

    try:
        with connect_sync(url, socket_timeout=1) as client:  # any URL the services take (cluster, Sentinel)
            return all(client.exists(key) for key in beats)  # one key a call: keys of several slots on a cluster
    except redis.RedisError:
        return False


def _say(message: str) -> None:
    print(f"[up] {message}", file=sys.stderr)
