"""`python -m ectrans.local.tied_exec <parent pid> <program> [args]`: become `program` (same pid)
after asking Linux to send it SIGTERM when the parent dies, even by SIGKILL, so that the private
Redis of an `ectrans up` that was killed does not run on. Elsewhere it only runs the program.

A wrapper instead of `preexec_fn`: code between fork and exec is unsafe in a process with threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    parent, argv = int(sys.argv[1]), sys.argv[2:]
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request took effect
        sys.exit(0)
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
