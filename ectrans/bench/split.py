"""`ectrans bench split`: end-to-end latency of every split point k and of `auto`, per bandwidth.

The server is the real stack (private redis-server, dispatcher and worker processes) serving the
packaged all-MiniLM-L6-v2. The client is this process: a `LocalModel` of the same model on one
torch thread (a weak edge device with one core: the honest emulation on a small box, where the
client and the server share the CPU, but never at the same time, as tasks go one at a time) and an
`AsyncClient` whose connections (submissions and the reply reader alike) reach Redis through
`Shaper`, a user-space shaped link: a rate limit in both directions plus a fixed one-way delay.

For each bandwidth, every input is run once at every fixed k (`SplitClient(split=k)`) and once
with `split="auto"` (a fresh client and `LinkEstimator` per bandwidth, so `auto` learns each link
from its own traffic), one task at a time, priority realtime, in an order rotated per input so that
drift on a shared host falls on every k alike: the sweep. Then the duel: `auto`, the sweep's two
best fixed k and the k auto chose most run again on more inputs, the same way, so that the
comparison that decides the target rests on more than a handful of noisy samples. Latency is the
client's: `perf_counter` around `SplitClient.run`, choosing, local compute, packing, the link and
the server included. Figures are medians over all of a point's samples (`samples_per_point`);
`auto_vs_best_fixed` divides `auto`'s median by the best fixed k's, and the target is <= 1.10 at
every bandwidth.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal
from urllib.parse import urlparse

from ectrans.bench.harness import (
    RESULT_TIMEOUT_S,
    ServiceStack,
    json_details,
    load_average,
    machine_info,
    markdown_table,
    note,
    progress,
    run_async,
    stop_on_sigterm,
    write_report,
)
from ectrans.bench.shaper import DEFAULT_DELAY_MS, Shaper
from ectrans.bench.workload import sample_texts
from ectrans.client import AsyncClient
from ectrans.common.registry import packaged_minilm_path
from ectrans.models.profile import LatencyModel
from ectrans.split.client import SplitClient
from ectrans.split.link import LinkEstimator
from ectrans.split.local import LocalModel

SEED = 2026
MODEL = "minilm"
OP = "embed"
BANDWIDTHS_BPS = (1e6, 10e6, 100e6)
TARGET_RATIO = 1.10
WARM_TASKS = 16  # the worker publishes its batch cost after 8 batches
COST_WAIT_S = 20.0
# A pause after every call: what a call leaves running (the worker's metrics, the client's reply
# trimming) must not land on the next call, or the points that follow server calls more often pay.
SETTLE_S = 0.03
DUEL_FIXED = 2  # the best fixed points of the sweep that run again beside auto (and its usual k)
AUTO: Literal["auto"] = "auto"
Point = int | str  # a fixed k, or AUTO


@dataclass(frozen=True)
class Size:
    tasks: int  # inputs per (bandwidth, split point) in the sweep over every point
    duel: int  # further inputs for auto and the sweep's best fixed points, per bandwidth
    all_points: bool = True  # False: k in {0, 1, 2, K-1, K} only (the smoke test)


TINY = Size(tasks=2, duel=2, all_points=False)
QUICK = Size(tasks=5, duel=24)
FULL = Size(tasks=30, duel=100)


def choose_size(quick: bool) -> Size:
    if os.environ.get("ECTRANS_BENCH_SIZE") == "tiny":
        return TINY
    return QUICK if quick else FULL


def split_points(size: Size, all_local: int) -> list[int]:
    if size.all_points:
        return list(range(all_local + 1))
    return sorted({0, 1, 2, all_local - 1, all_local})


def mbps(bandwidth_bps: float) -> str:
    return f"{bandwidth_bps / 1e6:g}"


# 1. One bandwidth -------------------------------------------------------------------------------------


@dataclass
class Samples:
    """Client-side latencies (ms) of each split point at one bandwidth, and what `auto` chose."""

    latency_ms: dict[Point, list[float]] = field(default_factory=dict)
    predicted_ms: list[tuple[float, ...]] = field(default_factory=list)  # auto's prediction of every k, per call
    auto: SplitClient | None = None

    def add(self, point: Point, ms: float) -> None:
        self.latency_ms.setdefault(point, []).append(ms)

    def median(self, point: Point) -> float:
        return statistics.median(self.latency_ms[point])

    def mean(self, point: Point) -> float:
        return statistics.fmean(self.latency_ms[point])


def rotated(points: Sequence[Point], index: int) -> list[Point]:
    """Input `index` runs the points starting at a different one each time (and backwards every
    other input), so that no split point always follows the same neighbour or runs first."""
    shift = index % len(points)
    order = [*points[shift:], *points[:shift]]
    return order[::-1] if index % 2 else order


async def timed_run(split: SplitClient, text: str) -> float:
    started = time.perf_counter()
    results = await split.run(OP, [text], priority="realtime", timeout=RESULT_TIMEOUT_S)
    elapsed_ms = (time.perf_counter() - started) * 1000.0
    if not results[0].ok:
        raise RuntimeError(f"split task failed: {results[0].reason}: {results[0].error}")
    return elapsed_ms


@dataclass(frozen=True)
class Edge:
    """The client's side: its copy of the model and its profile (measured once, before timing)."""

    local: LocalModel
    profile: list[LatencyModel]

    def split(self, client: AsyncClient, k: int | Literal["auto"]) -> SplitClient:
        # A fresh LinkEstimator each time: `auto` learns every link from its own traffic.
        return SplitClient(client, self.local, split=k, link=LinkEstimator(), profile=self.profile)


async def one_bandwidth(
    client: AsyncClient, edge: Edge, points: list[int], texts: tuple[list[str], list[str]], step: Any
) -> Samples:
    """The sweep (every point on the same inputs), then the duel: auto against the sweep's best fixed
    points and its own usual choice, on more inputs. Near-equal points are told apart by the duel's
    samples, and the best fixed point is not merely the luckiest of many small samples."""
    sweep, duel = texts
    auto = edge.split(client, AUTO)
    splits: dict[Point, SplitClient] = {**{k: edge.split(client, k) for k in points}, AUTO: auto}
    samples = Samples(auto=auto)
    await run_rounds(samples, splits, sweep, step)
    await run_rounds(samples, {point: splits[point] for point in duel_points(samples, points)}, duel, step)
    return samples


def duel_points(samples: Samples, points: list[int]) -> list[Point]:
    """The sweep's best fixed points, the k auto chose most (if another), and auto."""
    best: list[Point] = list(sorted(points, key=samples.median)[:DUEL_FIXED])
    if samples.auto is not None and samples.auto.decisions:
        usual = samples.auto.decisions.most_common(1)[0][0]
        best += [usual] if usual not in best else []
    return [*best, AUTO]


async def run_rounds(samples: Samples, splits: dict[Point, SplitClient], texts: list[str], step: Any) -> None:
    """Every input once at every point, the order rotated per input."""
    auto = samples.auto
    for index, text in enumerate(texts):
        for point in rotated(list(splits), index):
            samples.add(point, await timed_run(splits[point], text))
            if point == AUTO and auto is not None and auto.last is not None:
                samples.predicted_ms.append(auto.last.predicted_ms)
            step()
            await asyncio.sleep(SETTLE_S)


# 2. Setting up: the server warm, the client profiled ------------------------------------------------------


async def warm_server(client: AsyncClient, texts: list[str]) -> dict[str, Any]:
    """Single tasks until the worker has published its batch cost (the chooser reads it)."""
    for text in (texts * WARM_TASKS)[:WARM_TASKS]:
        result = await client.submit(MODEL, OP, text, priority="realtime", timeout=RESULT_TIMEOUT_S)
        result.raise_for_status()
    deadline = time.monotonic() + COST_WAIT_S
    while (cost := (await client.model_state(MODEL))[0]) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the worker published no batch cost for {MODEL} in {COST_WAIT_S:.0f}s")
        await client.submit(MODEL, OP, texts[0], priority="realtime", timeout=RESULT_TIMEOUT_S)
    return asdict(cost)


def profile_client(local: LocalModel) -> tuple[list[LatencyModel], float]:
    """The client's per-unit profile, measured afresh (a temporary cache), and the seconds it took."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ectrans-split-profile-") as cache:
        profile = local.profile(cache_dir=cache, refresh=True)
    return profile, time.perf_counter() - started


def payload_bytes(local: LocalModel, text: str) -> dict[str, int]:
    """Bytes each split point sends for one input: the text, the packed state, or nothing (k = K)."""
    sizes = {"0": len(text.encode())}
    sizes |= {str(k): len(local.payloads([text], k)[0]) for k in range(1, local.all_local)}
    sizes[str(local.all_local)] = 0
    return sizes


def median_text(local: LocalModel, texts: list[str]) -> tuple[str, int]:
    tokens = local.tokenize.count_tokens(texts)
    ranked = sorted(zip(tokens, texts, strict=True))
    count, text = ranked[len(ranked) // 2]
    return text, count


# 3. The run ---------------------------------------------------------------------------------------------


@dataclass
class Setting:
    bandwidth_bps: float
    samples: Samples
    points: list[int]


async def measure(
    stack: ServiceStack, edge: Edge, size: Size, texts: tuple[list[str], list[str]], delay_ms: float
) -> tuple[list[Setting], dict[str, Any]]:
    target = urlparse(stack.url)
    points = split_points(size, edge.local.all_local)
    shaper = Shaper(target.hostname or "127.0.0.1", target.port or 6379, BANDWIDTHS_BPS[-1], delay_ms)
    async with shaper as link, AsyncClient(link.url, prefix=stack.prefix) as client:
        cost = await warm_server(client, texts[0])
        note(f"server warm: batch cost {cost['overhead_ms']:.2f} ms + {cost['ms_per_token']:.3f} ms/token")
        settings = []
        with progress() as bars:
            per_bandwidth = len(texts[0]) * (len(points) + 1) + len(texts[1]) * (DUEL_FIXED + 2)  # at most
            task = bars.add_task("split points x bandwidths", total=len(BANDWIDTHS_BPS) * per_bandwidth)
            for bandwidth in BANDWIDTHS_BPS:
                link.rate_bps = bandwidth
                samples = await one_bandwidth(client, edge, points, texts, lambda: bars.advance(task))
                settings.append(Setting(bandwidth, samples, points))
                note(summary_line(settings[-1]))
        cost_after = (await client.model_state(MODEL))[0]
    return settings, {"warm": cost, "after": asdict(cost_after) if cost_after else None}


def summary_line(setting: Setting) -> str:
    samples = setting.samples
    best_k = min(setting.points, key=samples.median)
    best, auto = samples.median(best_k), samples.median(AUTO)
    chose = dict(samples.auto.decisions) if samples.auto else {}
    return (
        f"{mbps(setting.bandwidth_bps)} Mbit/s: best fixed k={best_k} {best:.1f} ms, auto {auto:.1f} ms "
        f"({auto / best:.2f}x), auto chose {chose}"
    )


def run(quick: bool) -> dict[str, Any]:
    with stop_on_sigterm():
        return _run(choose_size(quick), quick)


def _run(size: Size, quick: bool) -> dict[str, Any]:
    started = time.monotonic()
    info = machine_info()
    texts = sample_texts(size.tasks, seed=SEED, mix="short"), sample_texts(size.duel, seed=SEED + 1, mix="short")
    delay_ms = float(os.environ.get("ECTRANS_BENCH_DELAY_MS", DEFAULT_DELAY_MS))
    with ServiceStack(serve_models=MODEL).launch() as stack:
        local = LocalModel(packaged_minilm_path(), name=MODEL, threads=1)  # loads while the stack starts
        stack.wait_ready()
        note(f"stack and client ready in {time.monotonic() - started:.1f}s")
        profile, profile_s = profile_client(local)
        note(f"client profiled in {profile_s:.1f}s: {sum(m.predict(1, 24) for m in profile):.1f} ms at 24 tokens")
        settings, server_cost = run_async(lambda: measure(stack, Edge(local, profile), size, texts, delay_ms))
    text, tokens = median_text(local, [*texts[0], *texts[1]])
    result = figures(settings)
    result.update(
        {
            "scenario": "split",
            "quick": quick,
            "device": info["device"],
            "model": MODEL,
            "units": local.units,
            "payload_bytes": payload_bytes(local, text),
            "median_text_tokens": tokens,
            "client_threads": 1,
            "delay_ms": delay_ms,
            "rtt_ms": 2 * delay_ms,
            "tasks_per_point": size.tasks,
            "duel_tasks": size.duel,
            "target_ratio": TARGET_RATIO,
            "profile_s": round(profile_s, 2),
            "client_profile_ms": [round(m.predict(1, tokens), 3) for m in profile],
            "server_cost": server_cost,
            "workload": {"mix": "short", "seeds": [SEED, SEED + 1], "op": OP, "priority": "realtime"},
            "machine": {**info, "load_average_at_end": load_average()},
            "elapsed_s": round(time.monotonic() - started, 1),
        }
    )
    result["report"] = write_report("split", result, markdown(result), lambda fig: draw(fig, result))
    return result


FIGURES = (
    "latency_ms",
    "latency_mean_ms",
    "samples_per_point",
    "samples_ms",
    "best_fixed_k",
    "auto_vs_best_fixed",
    "auto_vs_best_fixed_ci90",
    "auto_within_10pct",
    "auto_choices",
    "predicted_ms",
    "predicted_median_ms",
    "auto_state",
)


def figures(settings: list[Setting]) -> dict[str, Any]:
    """Each figure keyed by bandwidth in Mbit/s ("1", "10", "100"), and whether the target was met."""
    per_bandwidth = {mbps(s.bandwidth_bps): setting_figures(s) for s in settings}
    out: dict[str, Any] = {"bandwidths_mbps": [float(mbps(s.bandwidth_bps)) for s in settings]}
    for key in FIGURES:
        out[key] = {bw: figs[key] for bw, figs in per_bandwidth.items() if key in figs}
    out["meets_target"] = all(out["auto_within_10pct"].values())
    return out


def setting_figures(setting: Setting) -> dict[str, Any]:
    samples, auto = setting.samples, setting.samples.auto
    assert auto is not None and auto.last is not None
    points: list[Point] = [*setting.points, AUTO]
    best_k = min(setting.points, key=samples.median)
    ratio = samples.median(AUTO) / samples.median(best_k)
    predicted = zip(*samples.predicted_ms, strict=True)  # per k, over auto's calls
    return {
        "latency_ms": {str(p): round(samples.median(p), 2) for p in points},
        "latency_mean_ms": {str(p): round(samples.mean(p), 2) for p in points},
        "samples_per_point": {str(p): len(samples.latency_ms[p]) for p in points},
        "samples_ms": {str(p): [round(ms, 1) for ms in samples.latency_ms[p]] for p in points},  # in run order
        "best_fixed_k": best_k,
        "auto_vs_best_fixed": round(ratio, 3),
        "auto_vs_best_fixed_ci90": ratio_interval(samples.latency_ms[AUTO], samples.latency_ms[best_k]),
        "auto_within_10pct": ratio <= TARGET_RATIO,
        "auto_choices": {str(k): n for k, n in sorted(auto.decisions.items())},
        "predicted_ms": {str(k): round(ms, 2) for k, ms in enumerate(auto.last.predicted_ms)},  # its last call
        "predicted_median_ms": {str(k): round(statistics.median(ms), 2) for k, ms in enumerate(predicted)},
        "auto_state": auto_state(auto),
    }


def ratio_interval(auto: list[float], best: list[float], resamples: int = 1000) -> list[float]:
    """A 90% bootstrap interval of median(auto) / median(best): how far the host's noise alone could
    move the ratio with this many samples (each point resampled on its own)."""
    rng = random.Random(SEED)
    ratios = sorted(
        statistics.median(rng.choices(auto, k=len(auto))) / statistics.median(rng.choices(best, k=len(best)))
        for _ in range(resamples)
    )
    return [round(ratios[int(0.05 * resamples)], 3), round(ratios[int(0.95 * resamples) - 1], 3)]


def auto_state(auto: SplitClient) -> dict[str, float]:
    """What `auto` believed at its last call: the link, and how far its compute models had drifted."""
    assert auto.last is not None
    return {
        "bandwidth_mbps": round(auto.last.link.bandwidth_bps / 1e6, 3),
        "rtt_ms": round(auto.last.link.rtt_ms, 2),
        "queue_wait_ms": round(auto.last.queue_wait_ms, 2),
        "server_overhead_ms": round(auto.last.server_overhead_ms, 2),
        "client_speed_ratio": round(auto.client_speed.value, 3),  # measured / profiled
        "server_speed_ratio": round(auto.server_speed.value, 3),  # measured / published cost
    }


# 4. Report ------------------------------------------------------------------------------------------------


def point_label(point: str, units: list[str]) -> str:
    if point == AUTO:
        return "auto"
    k = int(point)
    if k == 0:
        return "0 (text: all on the server)"
    if k == len(units):
        return f"{k} (all local)"
    return f"{k} (after {units[k - 1]})"


def markdown(result: dict[str, Any]) -> str:
    bws = [mbps(b * 1e6) for b in result["bandwidths_mbps"]]
    points = list(result["latency_ms"][bws[0]])
    predicted = [
        [point_label(p, result["units"]), *(result["predicted_median_ms"].get(bw, {}).get(p) for bw in bws)]
        for p in points
        if p != AUTO
    ]
    met = "met" if result["meets_target"] else "NOT met"
    return "\n".join(
        [
            *_intro(result),
            markdown_table(["split point k", *(f"{bw} Mbit/s (ms)" for bw in bws), "bytes sent"], _rows(result, bws)),
            "",
            f"Target: auto within {100 * (result['target_ratio'] - 1):.0f}% of the best fixed k at every bandwidth: "
            f"**{met}**.",
            "",
            "What auto predicted for each k (median over its calls):",
            "",
            markdown_table(["split point k", *(f"{bw} Mbit/s (ms)" for bw in bws)], predicted),
            "",
            *_closing(result),
            *json_details(result),
        ]
    )


def _intro(result: dict[str, Any]) -> list[str]:
    machine = result["machine"]
    return [
        "# Benchmark `split`",
        "",
        f"`{machine['command']}` on {machine['cpu']} ({machine['cores']} cores, {result['device']}), "
        f"{machine['date']}, git {machine['git']}.",
        "",
        f"Median client-side latency of one MiniLM embedding (priority realtime, one task at a time, median "
        f"input {result['median_text_tokens']} tokens) when the client runs units[0:k] and the server the rest; "
        f"`auto` picks k per call. Every k ran on {result['tasks_per_point']} inputs per bandwidth (the sweep); "
        f"auto, the sweep's two best k and auto's usual k on {result['duel_tasks']} more (the duel), the order "
        f"rotated per input. Link: a user-space shaped proxy in front of Redis, the rate in both directions and "
        f"{result['delay_ms']:g} ms one-way delay. The client is one torch thread in the benchmark process (a weak "
        "one-core edge device); the server is the stack's worker on the same machine.",
        "",
    ]


def _rows(result: dict[str, Any], bws: list[str]) -> list[list[Any]]:
    """Median latency of every point per bandwidth, then the comparison that decides the target."""
    rows: list[list[Any]] = [
        [point_label(p, result["units"]), *(result["latency_ms"][bw][p] for bw in bws), result["payload_bytes"].get(p)]
        for p in result["latency_ms"][bws[0]]
    ]
    rows.append(["best fixed k", *(result["best_fixed_k"][bw] for bw in bws), None])
    rows.append(["auto / best fixed", *(result["auto_vs_best_fixed"][bw] for bw in bws), None])
    rows.append(["90% interval (bootstrap)", *(_interval(result["auto_vs_best_fixed_ci90"][bw]) for bw in bws), None])
    rows.append(["auto chose k (count)", *(_choices(result["auto_choices"][bw]) for bw in bws), None])
    return rows


def _closing(result: dict[str, Any]) -> list[str]:
    machine = result["machine"]
    start, end = machine["load_average_at_start"][:1], machine["load_average_at_end"][:1]
    return [
        f"Client profile: {result['profile_s']:.1f} s (once, before timing). Run took {result['elapsed_s']:.0f} s. "
        f"Load average (1 min) {start[0] if start else '?'} at start, {end[0] if end else '?'} at end, on "
        f"{machine['cores']} cores: other work on a shared host slows every point, and the sweep's "
        f"{result['tasks_per_point']}-sample medians most.",
        "",
    ]


def _interval(bounds: list[float]) -> str:
    return f"{bounds[0]:.2f}-{bounds[1]:.2f}"


def _choices(choices: dict[str, int]) -> str:
    return ", ".join(f"{k}: {n}" for k, n in choices.items())


def draw(figure: Any, result: dict[str, Any]) -> None:
    """Measured latency against k per bandwidth (log scale), auto dashed; predictions beside."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    measured, predicted = figure.subplots(1, 2, sharey=True)
    for index, bandwidth in enumerate(result["bandwidths_mbps"]):
        bw, colour = mbps(bandwidth * 1e6), f"C{index}"
        latency = {p: ms for p, ms in result["latency_ms"][bw].items() if p != AUTO}
        ks = [int(p) for p in latency]
        measured.plot(ks, list(latency.values()), "o-", color=colour, label=f"{bw} Mbit/s")
        measured.axhline(result["latency_ms"][bw][AUTO], color=colour, linestyle="--", label=f"auto, {bw} Mbit/s")
        guess = result["predicted_median_ms"].get(bw, {})
        predicted.plot([int(k) for k in guess], list(guess.values()), "x--", color=colour, label=f"predicted {bw}")
        predicted.plot(ks, list(latency.values()), "o-", color=colour, alpha=0.35, label=f"measured {bw}")
    for axes, title in ((measured, "measured (median)"), (predicted, "auto's prediction vs measured")):
        axes.set_yscale("log")
        axes.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))  # 20, 30, 50, 100: not powers of ten
        axes.yaxis.set_major_formatter(ScalarFormatter())
        axes.yaxis.set_minor_formatter(NullFormatter())
        axes.set_xlabel("split point k (units run on the client)")
        axes.set_title(title)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=7)
    measured.set_ylabel("end-to-end latency (ms)")
