"""`python -m ectrans.local.tied_exec <parent pid> <program> [args]`: become `program` (same pid)
after asking Linux to send it SIGTERM when the parent dies, even by SIGKILL, so that the private
Redis of an `ectrans up` that was killed does not run on. Elsewhere it only runs the program.

A wrapper instead of `preexec_fn`: code between fork and exec is unsafe in a process with threads.
`ectrans.bench.tied` does the same for a Python module, with `tie_to` below.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def tie_to(parent: int) -> bool:
    """Ask for SIGTERM when `parent` dies (Linux; elsewhere nothing). False when it already died
    before the request took effect: the caller should exit rather than run on, untied."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    return os.getppid() == parent


def main() -> None:
    parent, argv = int(sys.argv[1]), sys.argv[2:]
    if not tie_to(parent):
        sys.exit(0)
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
