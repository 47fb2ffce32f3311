"""The logic of the CUDA paths that runs without a GPU: the fork guard, the allocator check, the
holder fence, NVML readings that fail one GPU at a time, and GPU memory attributed to workers.

Only what cannot exist here is stood in for: NVML's answers (a fake module object) and the text of
/proc files from another pid namespace. The logic under test is the real one.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ectrans.services.monitor.collect import Beat, DeviceState, Nvml, nvml_pids_are_ours
from ectrans.services.monitor.instances import InstanceState
from ectrans.services.monitor.report import Snapshot, gpu_by_pid
from ectrans.services.monitor.service import with_weights
from ectrans.services.monitor.stats import Totals, Window
from ectrans.sharing.cuda_env import cuda_driver_loaded, ipc_allocator_problem, without_expandable_segments
from ectrans.sharing.executor_process import HolderLink
from ectrans.sharing.memory import memory_fields
from ectrans.sharing.weight_server import bind, serve
from ectrans.sharing.zygote import SpawnError, check_fork_safe

MAPS_WITH_DRIVER = """\
7f00-7f10 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15
7f20-7f30 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1
"""
MAPS_NVML_ONLY = """\
7f20-7f30 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1
7f40-7f50 r-xp 00000000 08:01 3 /venv/lib/python3.12/site-packages/torch/lib/libtorch_cuda.so
7f60-7f70 rw-p 00000000 00:00 0 [heap]
"""


# 1. Fork guard and allocator settings -------------------------------------------------------------


def test_a_loaded_cuda_driver_is_seen_even_without_torch_init() -> None:
    assert cuda_driver_loaded(MAPS_WITH_DRIVER)
    assert not cuda_driver_loaded(MAPS_NVML_ONLY)  # NVML and torch's own libraries do not count
    assert not cuda_driver_loaded()  # this test process (CPU torch) never loads it


def test_the_zygote_refuses_to_fork_after_the_driver_was_loaded() -> None:
    with pytest.raises(SpawnError, match="CUDA driver was initialised"):
        check_fork_safe(MAPS_WITH_DRIVER)
    check_fork_safe(MAPS_NVML_ONLY)


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({}, False),
        ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, False),
        ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}, False),
        ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128, expandable_segments:True"}, True),
        ({"PYTORCH_ALLOC_CONF": "expandable_segments:True"}, True),
    ],
)
def test_expandable_segments_are_named_and_dropped_for_the_holder(env: dict[str, str], problem: bool) -> None:
    found = ipc_allocator_problem(env)
    assert (found is not None) == problem
    if found is not None:
        assert "expandable_segments" in found
    cleaned = without_expandable_segments(env | {"PATH": "/bin"})
    assert ipc_allocator_problem(cleaned) is None
    assert cleaned["PATH"] == "/bin"
    if "max_split_size_mb" in env.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        assert "max_split_size_mb:128" in cleaned["PYTORCH_CUDA_ALLOC_CONF"]


# 2. The holder fence --------------------------------------------------------------------------------


def test_the_fence_passes_while_the_holder_lives_and_fails_once_it_is_gone(tmp_path: Path) -> None:
    """The real holder server loop in a thread; a result is fenced by a byte it echoes."""
    listener = bind(tmp_path / "holder.sock")
    control_read, control_write = os.pipe()
    server = threading.Thread(target=serve, args=(listener, lambda _r: (b"manifest", []), control_read))
    server.start()
    lost = threading.Event()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(tmp_path / "holder.sock"))
        from ectrans.common.codec import packb
        from ectrans.sharing.ipc import recv_frame, send_frame

        send_frame(sock, packb({"op": "attach", "pid": os.getpid()}))
        assert recv_frame(sock) == (b"manifest", [])
        link = HolderLink(sock, lost.set)
        assert all(link.fence(timeout=5) for _ in range(20))
        os.close(control_write)  # the supervisor goes: the holder exits, closing every connection
        server.join(10)
        listener.close()
        assert lost.wait(10)
        assert not link.fence(timeout=5)
    finally:
        os.close(control_read)
        sock.close()


def test_a_silent_holder_fails_the_fence_in_time() -> None:
    ours, theirs = socket.socketpair()
    link = HolderLink(ours, lambda: None)
    try:
        started = time.monotonic()
        assert not link.fence(timeout=0.2)  # nobody echoes
        assert time.monotonic() - started < 5
        theirs.sendall(b"f")  # a late echo does not make the next fence pass early
        assert not link.fence(timeout=0.2)
    finally:
        link.close()
        theirs.close()


# 3. NVML, one GPU at a time --------------------------------------------------------------------------


class FakeNvmlError(Exception):
    pass


def fake_pynvml(broken: set[int], no_utilisation: set[int]) -> Any:
    """NVML's answers for three GPUs; `broken` ones fail as a MIG parent or a lost GPU does."""

    def handle(index: int) -> int:
        if index in broken:
            raise FakeNvmlError("Not Supported")
        return index

    def utilisation(index: int) -> Any:
        if index in no_utilisation:
            raise FakeNvmlError("Not Supported")
        return SimpleNamespace(gpu=40)

    return SimpleNamespace(
        NVMLError=FakeNvmlError,
        nvmlDeviceGetCount=lambda: 3,
        nvmlDeviceGetHandleByIndex=handle,
        nvmlDeviceGetMemoryInfo=lambda i: SimpleNamespace(used=(i + 1) * 2**30, total=80 * 2**30),
        nvmlDeviceGetUtilizationRates=utilisation,
        nvmlDeviceGetComputeRunningProcesses=lambda i: [SimpleNamespace(pid=100 + i, usedGpuMemory=2**20)],
        nvmlDeviceGetName=lambda i: b"NVIDIA H100 80GB HBM3",
    )


def test_one_unreadable_gpu_leaves_the_others_in_the_report() -> None:
    nvml = Nvml()
    nvml.available, nvml._nvml = True, fake_pynvml(broken={1}, no_utilisation={2})
    devices = nvml.devices()
    assert [d.device for d in devices] == ["cuda:0", "cuda:2"]
    assert devices[0].utilisation_pct == 40.0 and devices[1].utilisation_pct == 0.0
    assert devices[1].processes == {102: 2**20}
    nvml.available = False  # nothing to shut down


# 4. GPU memory attributed to workers -----------------------------------------------------------------


WORKER_PID, HOLDER_PID, EXECUTOR_PIDS = 10, 11, [12, 13]


def pool_report(device: str) -> dict[str, Any]:
    """A `SharedExecutorPool.memory()` report as the pool writes it (see `measure_memory`)."""
    return {
        "model": "prototype",
        "device": device,
        "shared": True,
        "weights_bytes": 356 * 2**20,
        "holder_pid": HOLDER_PID,
        "holder": {"pss": 1},
        "zygote_pid": 14,
        "zygote": {"pss": 1},
        "executor_pids": EXECUTOR_PIDS,
        "executors_pss": [1, 1],
        "executors_private": [1, 1],
        "executors_cuda_reserved": [100 * 2**20, 120 * 2**20],
        "holder_cuda_reserved": 400 * 2**20,
        "pss_sum": 4,
    }


def worker(device: str) -> InstanceState:
    fields = {k: str(v) for k, v in memory_fields([pool_report(device)]).items()}
    return InstanceState("worker", "w-0", "node", WORKER_PID, 0.0, 0.0, fields=fields)


def snapshot(instances: list[InstanceState], processes: dict[int, int]) -> Snapshot:
    gpu = DeviceState("cuda:0", "H100", 2**33, 2**36, 10.0, processes)
    return Snapshot(0.0, 1.0, "m", Window(), Totals(), {}, 0, instances, [gpu])


def test_shared_gpu_weights_are_filed_under_their_gpu() -> None:
    inst = worker("cuda")
    beat = Beat("worker", "w-0", "node", WORKER_PID, 0.0, 0.0, 1.0, fields=inst.fields)
    devices = with_weights([DeviceState("cpu", "host", 1, 2, 0.0), DeviceState("cuda:0", "H100", 1, 2, 0.0)], [beat])
    assert [d.weights_bytes for d in devices] == [None, 356 * 2**20]
    cpu_beat = Beat("worker", "w-1", "node", 20, 0.0, 0.0, 1.0, fields=worker("cpu").fields)
    devices = with_weights(
        [DeviceState("cpu", "host", 1, 2, 0.0), DeviceState("cuda:0", "H100", 1, 2, 0.0)], [cpu_beat]
    )
    assert [d.weights_bytes for d in devices] == [356 * 2**20, None]


def test_nvml_memory_of_holder_and_executors_counts_for_their_worker() -> None:
    processes = {HOLDER_PID: 900 * 2**20, 12: 600 * 2**20, 13: 620 * 2**20, 999: 5 * 2**30}
    figures = gpu_by_pid(snapshot([worker("cuda")], processes), "node", nvml_pids_usable=True)
    assert figures == {WORKER_PID: (900 + 600 + 620) * 2**20}


def test_in_another_pid_namespace_the_allocator_figures_stand_in() -> None:
    host_pids = {4711: 900 * 2**20, 4712: 600 * 2**20}  # NVML's pids are the host's: none match
    for usable in (True, False):
        figures = gpu_by_pid(snapshot([worker("cuda")], host_pids), "node", nvml_pids_usable=usable)
        assert figures == {WORKER_PID: (400 + 100 + 120) * 2**20}
    assert gpu_by_pid(snapshot([worker("cpu")], host_pids), "node", nvml_pids_usable=False) == {}


def test_the_pid_namespace_is_read_from_nspid() -> None:
    assert nvml_pids_are_ours("Name:\tpython\nNSpid:\t4711\n")
    assert not nvml_pids_are_ours("Name:\tpython\nNSpid:\t4711\t12\n")
    assert nvml_pids_are_ours("Name:\tpython\n")  # kernels without NSpid: no namespaces to tell apart
    assert isinstance(nvml_pids_are_ours(), bool)


def test_memory_fields_carry_the_pids_and_allocator_figures() -> None:
    fields = memory_fields([pool_report("cuda")])
    assert fields["holder_pids"] == str(HOLDER_PID)
    assert fields["executor_pids"] == "12,13"
    detail = json.loads(str(fields["weights"]))
    assert detail[0]["holder_cuda_reserved"] == 400 * 2**20
