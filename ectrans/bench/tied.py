"""`python -m ectrans.bench.tied <parent pid> <module> [args]`: run `module` as `python -m` would,
after asking Linux to send it SIGTERM when the parent dies (even by SIGKILL), so that no service a
benchmark started outlives the benchmark. Elsewhere it only runs the module."""

from __future__ import annotations

import runpy
import sys

from ectrans.local.tied_exec import tie_to


def main() -> None:
    parent, module = int(sys.argv[1]), sys.argv[2]
    del sys.argv[1:3]
    if not tie_to(parent):  # the parent died before the request took effect
        sys.exit(0)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
