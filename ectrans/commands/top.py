"""`ectrans top`: a live view of the node, like `nvidia-smi` or `htop`.

Reads what any Redis client can: the monitor's `ectrans:stats` hash (rates, latencies, devices),
and, live, the heartbeats and the streams. Ctrl-C leaves; `--once` prints one frame and exits."""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ectrans.common.redis_conn import RedisClient, connect, redact
from ectrans.common.settings import CommonSettings
from ectrans.local.stacks import add_redis_url_argument, with_local_stack
from ectrans.services.monitor.collect import Beat, StreamState, heartbeats, stream_states, watched_streams
from ectrans.services.monitor.report import GiB, MiB, Report, unflatten

STALE_BEATS = 2.0  # as the monitor's default: two missed heartbeats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between frames")
    parser.add_argument("--once", action="store_true", help="print one frame and exit")
    add_redis_url_argument(parser)


@dataclass
class Frame:
    """Everything one screen shows."""

    at: float
    url: str
    stats: Report
    beats: list[Beat]
    streams: dict[str, StreamState]
    models: list[str] = field(default_factory=list)


async def read_frame(redis: RedisClient, settings: CommonSettings) -> Frame:
    keys = settings.keys
    raw: dict[Any, Any] = await redis.hgetall(keys.stats)
    stats = unflatten({k.decode(): v.decode() for k, v in raw.items()})
    beats = await heartbeats(redis, keys)
    models = {entity.split("/", 1)[0] for entity in stats["classes"]}
    models |= {m for b in beats if b.service == "worker" for m in b.fields.get("models", "").split(",") if m}
    models -= {"none", "other"}
    streams = await stream_states(redis, watched_streams(keys, sorted(models)))
    return Frame(time.time(), redact(settings.redis_url), stats, beats, streams, sorted(models))


def _num(value: str | None, unit: str = "", digits: int = 1) -> str:
    if value is None or value in ("", "None"):
        return "-"
    return f"{float(value):.{digits}f}{unit}"


def _bytes(value: str | int | None) -> str:
    if value is None or value == "":
        return "-"
    size = int(value)
    return f"{size / GiB:.1f}G" if size >= 10 * GiB else f"{size / MiB:.0f}M"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def header(frame: Frame) -> Text:
    stats = frame.stats
    line = Text(f"ECTrans top  {frame.url}", style="bold")
    if "ts" in stats:
        age = frame.at - float(stats["ts"])
        line.append(f"  stats {age:.1f}s old (monitor {stats.get('monitor', '?')})", style="red" if age > 30 else "")
        line.append(f"\ntasks {stats.get('tasks_total', 0)}  {_num(stats.get('tasks_per_s'), '/s')}")
        line.append(f"  errors {stats.get('errors_total', 0)}  dead letters {stats.get('dead_letters', 0)}")
        line.append(f"  workers {stats.get('workers_live', 0)}/{stats.get('workers_known', 0)} live")
    else:
        line.append("  no stats yet: is the monitor running?", style="yellow")
    return line


def _table(title: str, columns: tuple[str, ...], left: int = 1) -> Table:
    """A compact table (no outer border, columns a space apart); the first `left` columns are text."""
    table = Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD, show_edge=False)
    table.padding = (0, 1, 0, 0)
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i < left else "right", no_wrap=True)
    return table


def devices_table(frame: Frame) -> Table:
    table = _table("Devices", ("device", "name", "memory used/total", "use", "util", "weights"), left=2)
    for device, f in sorted(frame.stats["devices"].items()):
        used, total = int(f.get("memory_used_bytes", 0)), int(f.get("memory_total_bytes", 0))
        share = used / total if total else 0.0
        style = "red" if share > 0.9 else ""
        table.add_row(
            device,
            f.get("name", ""),
            f"{_bytes(used)} / {_bytes(total)}",
            Text(f"{100 * share:.0f}%", style=style),
            _num(f.get("utilisation_pct"), "%", 0),
            _bytes(f.get("weights_bytes")),
        )
    return table


def _ms(value: str | None) -> str:
    """A latency in at most 5 characters: `850ms`, `12.4s`, `95s`."""
    if value is None or value in ("", "None"):
        return "-"
    ms = float(value)
    if ms < 1000:
        return f"{ms:.0f}ms"
    return f"{ms / 1000:.1f}s" if ms < 99_500 else f"{ms / 1000:.0f}s"


def _count(value: str | float | None, digits: int = 0) -> str:
    """A count or rate in few characters: `31.7`, `1241`, `12.4k`, `3.1M`."""
    if value is None or value in ("", "None"):
        return "-"
    number = float(value)
    for limit, suffix in ((1e6, "M"), (1e4, "k")):
        if number >= limit:
            return f"{number / (1e6 if suffix == 'M' else 1e3):.1f}{suffix}"
    return f"{number:.{digits}f}"


def classes_table(frame: Frame) -> Table:
    columns = ("model/class", "task/s", "tok/s", "p50", "p95", "p99", "queue", "run", "err", "late", "size", "pad")
    table = _table("Tasks: the last interval, and the total since the monitor started", (*columns, "total"))
    for entity, f in sorted(frame.stats["classes"].items()):
        errors = f.get("errors", "0")
        table.add_row(
            entity,
            _count(f.get("tasks_per_s"), 1),
            _count(f.get("tokens_per_s")),
            _ms(f.get("latency_p50_ms")),
            _ms(f.get("latency_p95_ms")),
            _ms(f.get("latency_p99_ms")),
            _ms(f.get("queue_p50_ms")),
            _ms(f.get("service_p50_ms")),
            Text(_count(errors), style="red" if errors != "0" else ""),
            _count(f.get("deadline_misses", "0")),
            _count(f.get("batch_mean"), 1),
            "-" if "padding_waste" not in f else f"{100 * float(f['padding_waste']):.0f}%",
            _count(f.get("tasks_total", "0")),
        )
    return table


def streams_table(frame: Frame) -> Table:
    table = _table("Streams", ("stream", "length", "pending", "lag", "consumers", "oldest pending"))
    for stream, s in frame.streams.items():
        oldest = "-" if s.oldest_pending_s is None else _duration(s.oldest_pending_s)
        table.add_row(stream, str(s.length), str(s.pending), str(s.lag), str(s.consumers), oldest)
    dead = frame.stats.get("dead_letters")
    if dead is not None:
        table.add_row("dead letters", Text(str(dead), style="red" if dead != "0" else ""), "", "", "", "")
    return table


def _state(beat: Beat, now: float) -> str:
    if beat.age_s(now) > STALE_BEATS * (beat.interval_s or 2.0):
        return "stale"
    return "live"


def instances_table(frame: Frame) -> Table:
    columns = ("service", "instance", "state", "pid", "beat", "uptime", "restarts", "rss", "pss", "uss")
    table = _table("Instances", columns, left=3)
    known = frame.stats["instances"]
    seen = set()
    for beat in frame.beats:
        entity = f"{beat.service}/{beat.instance}"
        seen.add(entity)
        state = _state(beat, frame.at)
        table.add_row(
            beat.service,
            beat.instance,
            Text(state, style="green" if state == "live" else "red"),
            str(beat.pid),
            f"{beat.age_s(frame.at):.1f}s",
            _duration(max(0.0, frame.at - beat.started)),
            known.get(entity, {}).get("restarts", "-"),
            _bytes(beat.memory.get("rss")),
            _bytes(beat.memory.get("pss")),
            _bytes(beat.memory.get("uss")),
        )
    for entity, f in sorted(known.items()):  # gone (and cleanly stopped) ones only the monitor remembers
        if entity not in seen and f.get("state") in ("gone", "stopped"):
            service, _, instance = entity.partition("/")
            mark = Text(f["state"], style="red" if f["state"] == "gone" else "dim")
            table.add_row(service, instance, mark, f.get("pid", "-"), "-", "-", f.get("restarts", "-"))
    return table


def render(frame: Frame) -> RenderableType:
    parts: list[RenderableType] = [
        header(frame),
        devices_table(frame),
        classes_table(frame),
        streams_table(frame),
        instances_table(frame),
    ]
    parts += [Text(f"! {warning}", style="bold red") for warning in frame.stats.get("warnings", [])]
    return Group(*parts)


async def show(settings: CommonSettings, console: Console, *, once: bool, interval_s: float) -> None:
    redis = connect(settings.redis_url, retries=2)
    try:
        frame = await read_frame(redis, settings)
        if once:
            console.print(render(frame))
            return
        with Live(render(frame), console=console, refresh_per_second=4, screen=False) as live:
            while True:
                await asyncio.sleep(interval_s)
                live.update(render(await read_frame(redis, settings)))
    finally:
        await redis.aclose()


def run(args: argparse.Namespace) -> int:
    settings = with_local_stack(CommonSettings(), args.redis_url)
    console = Console()
    try:
        asyncio.run(show(settings, console, once=args.once, interval_s=args.interval))
    except KeyboardInterrupt:
        return 0
    except RedisError as exc:
        console.print(f"ectrans top: cannot read {redact(settings.redis_url)}: {exc}", style="red")
        return 1
    return 0
