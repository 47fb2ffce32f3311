"""Subcommands of the `ectrans` CLI: each module has `add_arguments(parser)` and `run(args) -> int`."""
