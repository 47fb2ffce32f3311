"""`python -m tests.weights_writer SOCKET SPEC_JSON`: a process that attaches to a weight holder as
an executor does, then tries to write to the shared weights in every way a process could.

It prints one JSON line per attempt (`{"attempt": ..., "outcome": "ExceptionName: message"}`, or
`"wrote"` if the write went through). With CPU weights the last attempt is a raw store into its
read-only mapping of the shared file, which the kernel answers with SIGSEGV: the process dies,
the shared pages do not change. With CUDA weights only the attempts through torch are made.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys
from collections.abc import Callable

import numpy as np
import torch

from ectrans.sharing.attach import attach_model
from ectrans.sharing.executor_process import request_manifest
from ectrans.sharing.manifest import spec_from_wire


def attempt(name: str, write: Callable[[], object]) -> None:
    try:
        write()
        outcome = "wrote"
    except Exception as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"attempt": name, "outcome": outcome}), flush=True)


def main() -> int:
    socket_path, spec_json = sys.argv[1], sys.argv[2]
    spec = spec_from_wire(json.loads(spec_json))
    holder, manifest, fds = request_manifest(socket_path)
    fd = os.dup(fds[0]) if fds else -1  # CUDA weights come without a file
    attached = attach_model(spec, manifest, fds)
    weight = next(attached.model.parameters())
    with torch.no_grad():
        attempt("torch add_", lambda: weight.add_(1.0))
        attempt("torch copy_", lambda: weight.copy_(torch.zeros_like(weight)))
        attempt("torch setitem", lambda: weight.__setitem__(0, 0.0))
        attempt("tensor.numpy", weight.numpy)
    if fd < 0:
        holder.close()
        return 0
    attempt("pwrite to the shared file", lambda: os.pwrite(fd, b"\0", 0))
    attempt("ftruncate the shared file", lambda: os.ftruncate(fd, 0))
    attempt("writable shared mapping", lambda: mmap.mmap(fd, 4096, flags=mmap.MAP_SHARED, prot=mmap.PROT_WRITE))
    view = mmap.mmap(fd, 4096, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    address = np.frombuffer(view, dtype=np.uint8).ctypes.data
    print(json.dumps({"attempt": "raw store", "outcome": "next"}), flush=True)
    ctypes.memset(address, 0xFF, 1)  # SIGSEGV here
    print(json.dumps({"attempt": "raw store", "outcome": "wrote"}), flush=True)
    holder.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
