"""Where the stack that `ectrans up` started on this machine listens (like `ray start`'s address file).

`up` writes one small JSON file per stack name (default `default`) under `$XDG_RUNTIME_DIR/ectrans/`
(else `~/.cache/ectrans/`) and removes it on a clean stop; a file whose pid is gone is stale and
ignored (and removed). `ectrans top/submit/health` and the client use the recorded Redis URL and
prefix when none is given: a flag or `ECTRANS_REDIS_URL` (environment or `.env`) always wins.
`ECTRANS_STACK` picks a stack other than `default`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from ectrans.common.settings import CommonSettings

DEFAULT_NAME = "default"
# A name becomes part of a file name and of the stack's process names (`<host>-<name>-<n>`).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


@dataclass(frozen=True)
class LocalStack:
    name: str
    pid: int
    redis_url: str
    prefix: str
    started_at: float


class StackRunning(RuntimeError):
    """Another live `ectrans up` holds this stack name."""


class StackNotFound(RuntimeError):
    """`ECTRANS_STACK` names a stack that does not run on this machine."""


def state_dir() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "ectrans" if runtime else Path.home() / ".cache" / "ectrans"


class BadStackName(StackNotFound):
    """A stack name no stack can have (`ectrans up --name` refuses it too)."""


def checked_name(name: str) -> str:
    """`name`, if a stack can have it."""
    if not NAME_RE.fullmatch(name):
        rule = "1-63 of letters, digits, '.', '_' and '-', starting with a letter or digit"
        raise BadStackName(f"{name[:80]!r} is not a stack name: {rule}")
    return name


def stack_file(name: str) -> Path:
    return state_dir() / f"up-{checked_name(name)}.json"


def stack_name() -> str:
    return os.environ.get("ECTRANS_STACK") or DEFAULT_NAME


def find(name: str | None = None) -> LocalStack | None:
    """The live stack recorded under `name` (default: `$ECTRANS_STACK`, else `default`), or None."""
    path = stack_file(name or stack_name())
    try:
        stack = LocalStack(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if not _alive(stack.pid, stack.started_at):
        path.unlink(missing_ok=True)  # its `up` died without cleaning up
        return None
    return stack


def record(name: str, redis_url: str, prefix: str) -> LocalStack:
    """Claim `name` for this process; StackRunning if a live `up` already holds it."""
    stack = LocalStack(name, os.getpid(), redis_url, prefix, time.time())
    path = stack_file(name)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    # 0600: the URL can carry a password.
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(asdict(stack), out)
    try:
        for _ in range(3):  # a stale record found is removed, and the claim tried again
            try:
                # A hard link fails where the name exists: of two `up`s started at once, one claims it
                # (a check, then a write, let both claim it, and both ran under one name).
                os.link(temporary, path)
                return stack
            except FileExistsError:
                other = find(name)  # removes a record whose `up` is gone
                if other is None and _unreadable(path):  # not a record at all (a stale file of another kind)
                    path.unlink(missing_ok=True)
                if other is not None and other.pid != os.getpid():
                    raise StackRunning(
                        f"another `ectrans up` (pid {other.pid}) already runs the stack {name!r} at "
                        f"{other.redis_url}; stop it, or start this one with --name <other>"
                    ) from None
                if other is not None:  # this process's own record: rewritten
                    temporary.replace(path)
                    return stack
        raise StackRunning(f"could not claim the stack name {name!r}: its record at {path} keeps changing")
    finally:
        temporary.unlink(missing_ok=True)


def _unreadable(path: Path) -> bool:
    try:
        LocalStack(**json.loads(path.read_text()))
    except OSError:
        return False  # gone
    except (ValueError, TypeError):
        return True
    return False


def remove(stack: LocalStack) -> None:
    """Drop the record if it is still this stack's (a later `up` may have taken the name)."""
    current = find(stack.name)
    if current is not None and current.pid == stack.pid:
        stack_file(stack.name).unlink(missing_ok=True)


def add_redis_url_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url", help="Redis of the stack (default: $ECTRANS_REDIS_URL, else the one `ectrans up` runs here)"
    )


def with_local_stack(settings: CommonSettings, url: str | None = None) -> CommonSettings:
    """`settings` aimed at `url` if given, else at the local stack when Redis URL was not configured.
    A stack named by `ECTRANS_STACK` must run: falling back to the default URL would reach whatever
    Redis listens there (another stack's, perhaps) instead of the one asked for."""
    if url:
        return settings.model_copy(update={"redis_url": url})
    if "redis_url" in settings.model_fields_set:
        return settings
    if (stack := find()) is None:
        if (named := stack_name()) != DEFAULT_NAME:  # the default stack's absence is no error: no `up` ran
            raise StackNotFound(
                f"no stack named {named!r} runs on this machine (`ectrans up --name {named}` starts it);"
                " unset ECTRANS_STACK, or name a Redis with ECTRANS_REDIS_URL or --redis-url"
            )
        return settings
    update = {"redis_url": stack.redis_url}
    if "prefix" not in settings.model_fields_set:
        update["prefix"] = stack.prefix
    return settings.model_copy(update=update)


def _alive(pid: int, started_at: float) -> bool:
    """The recording process still runs (not a later process that reuses its pid)."""
    try:
        process = psutil.Process(pid)
        return bool(process.status() != psutil.STATUS_ZOMBIE and process.create_time() <= started_at + 1)
    except psutil.Error:
        return False
