"""`ectrans bench durability`: how many acknowledged writes a Redis SIGKILL takes, per `appendfsync`.

ECTrans's "nothing lost" rests on Redis keeping every write it acknowledged (the client's XADD of a
task, the worker's result). Through a process crash that holds under `appendfsync always`, and
under `everysec` only while the disk keeps up: when the once-a-second background fsync is still
running, Redis holds new AOF writes in memory for up to 2 s and answers its clients meanwhile, and a
SIGKILL then drops them. This scenario shows both, on this machine's disk and on a slow one:

- a private redis-server with AOF; one client INCRs a counter as fast as replies come back (every
  reply is an acknowledged write) while two others keep the disk busy with paced 256 KiB SETs;
  after a few seconds SIGKILL, start again on the same files, and `lost` = last acknowledged value
  − the value read;
- the slow disk: the same with an LD_PRELOAD shim, compiled here with the system C compiler, that
  makes every fsync/fdatasync 800 ms slower (a disk shared with busy neighbours). Without a C
  compiler that half is reported as skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ectrans.bench.harness import machine_info, note, size_for
from ectrans.local.redis_server import RedisServer

POLICIES = ("everysec", "always")
SLOW_FSYNC_MS = 800
BLOB_BYTES = 1 << 18
BUSY_PAUSE_S = 0.005  # two writers: up to ~100 MB/s into the AOF
SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <unistd.h>
/* A slow disk: every fsync and fdatasync takes SLOW_US longer. */
static int slow(const char *name, int fd) {
    int (*real)(int) = (int (*)(int))dlsym(RTLD_NEXT, name);
    usleep(SLOW_US);
    return real(fd);
}
int fdatasync(int fd) { return slow("fdatasync", fd); }
int fsync(int fd) { return slow("fsync", fd); }
"""


@dataclass(frozen=True)
class Size:
    trials: int  # kills per (policy, disk)
    seconds: float  # of writes before each kill


QUICK, FULL, TINY = Size(trials=3, seconds=2.0), Size(trials=10, seconds=4.0), Size(trials=1, seconds=1.0)


def build_shim(work_dir: Path) -> Path | None:
    """The slow-fsync shim as a shared library, or None where no C compiler is found."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source, library = work_dir / "slow_fsync.c", work_dir / "slow_fsync.so"
    source.write_text(SHIM_C)
    build = [compiler, "-shared", "-fPIC", f"-DSLOW_US={SLOW_FSYNC_MS * 1000}", "-o", str(library), str(source), "-ldl"]
    done = subprocess.run(build, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        note(f"durability: the slow-fsync shim did not build: {done.stderr[-500:]}")
        return None
    return library


def keep_disk_busy(port: int, stop: threading.Event) -> None:
    """256 KiB SETs, one per `BUSY_PAUSE_S`, until `stop` or the server goes away: each makes the next
    fsync longer. (Paced: an AOF of gigabytes would make every restart a long replay.)"""
    client = redis.Redis(port=port, retry=Retry(NoBackoff(), 0))  # no reconnecting to a killed server
    blob = bytes(BLOB_BYTES)
    written = 0
    try:
        while not stop.is_set():
            client.set(f"blob:{written % 64}", blob)
            written += 1
            stop.wait(BUSY_PAUSE_S)
    except redis.RedisError:
        return  # killed under us: the point of the exercise
    finally:
        client.close()


def kill_trial(policy: str, seconds: float, work_dir: Path, shim: Path | None) -> dict[str, int]:
    """Writes under `policy`, SIGKILL, restart on the same files: acknowledged vs kept."""
    env = None if shim is None else {**os.environ, "LD_PRELOAD": str(shim)}
    data_dir = Path(tempfile.mkdtemp(dir=work_dir))
    server = RedisServer(appendonly=True, data_dir=data_dir, extra_args=["--appendfsync", policy], env=env).start()
    client = redis.Redis(port=server.port)
    stop = threading.Event()
    busy = [threading.Thread(target=keep_disk_busy, args=(server.port, stop)) for _ in range(2)]
    for thread in busy:
        thread.start()
    acknowledged = 0
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            acknowledged = int(client.incr("counter"))
        server.stop(kill=True)
    finally:
        stop.set()
        for thread in busy:
            thread.join()
        client.close()
    server.env = None  # the restart only replays the AOF: no need for a slow disk there
    server.start(timeout_s=60)
    try:
        with redis.Redis(port=server.port) as check:
            kept = int(check.get("counter") or 0)
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    return {"acknowledged": acknowledged, "kept": kept, "lost": acknowledged - kept}


def run(quick: bool) -> dict[str, Any]:
    size = size_for(quick, QUICK, FULL, TINY)
    work_dir = Path(tempfile.mkdtemp(prefix="ectrans-durability-"))
    started = time.monotonic()
    try:
        shim = build_shim(work_dir)
        disks: dict[str, Path | None] = {"this_disk": None}
        if shim is not None:
            disks["slow_disk"] = shim
        trials: dict[str, dict[str, list[dict[str, int]]]] = {}
        for policy in POLICIES:
            for disk, library in disks.items():
                runs = [kill_trial(policy, size.seconds, work_dir, library) for _ in range(size.trials)]
                trials.setdefault(policy, {})[disk] = runs
                note(f"durability: {policy} on {disk}: lost " + ", ".join(str(r["lost"]) for r in runs))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    lost = {p: {d: sum(r["lost"] for r in runs) for d, runs in by_disk.items()} for p, by_disk in trials.items()}
    return {
        "scenario": "durability",
        "quick": quick,
        "trials": size.trials,
        "seconds_per_trial": size.seconds,
        "slow_fsync_ms": SLOW_FSYNC_MS if shim is not None else None,
        "slow_disk": "measured" if shim is not None else "skipped: no C compiler for the slow-fsync shim",
        "lost_acknowledged_writes": lost,
        "always_lost_nothing": all(n == 0 for n in lost["always"].values()),
        "runs": trials,
        "machine": machine_info(),
        "seconds": round(time.monotonic() - started, 1),
    }
