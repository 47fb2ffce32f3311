"""`python -m ectrans.bench.tied <parent pid> <module> [args]`: run `module` as `python -m` would,
after asking Linux to send it SIGTERM when the parent dies (even by SIGKILL), so that no service a
benchmark started outlives the benchmark. Elsewhere it only runs the module."""

from __future__ import annotations

import contextlib
import ctypes
import os
import runpy
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    parent, module = int(sys.argv[1]), sys.argv[2]
    del sys.argv[1:3]
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request took effect
        sys.exit(0)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
