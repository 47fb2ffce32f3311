"""The `baselines` scenario's markdown table and plot, drawn from its JSON result alone."""

from __future__ import annotations

from typing import Any

from ectrans.bench.harness import json_details, markdown_table

METHODS = (
    ("per_request", "per request (1 process, batch 1)"),
    ("multitask", "multitask (K processes, batch 1)"),
    ("plain_arrival", "plain loop, arrival order"),
    ("plain_sorted", "plain loop, length-sorted (upper bound)"),
    ("ectrans", "ECTrans (real stack, all submitted at once)"),
)
SHORT = {
    "per_request": "per req.",
    "multitask": "multitask",
    "plain_arrival": "plain\narrival",
    "plain_sorted": "plain\nsorted",
    "ectrans": "ECTrans",
}


def _label(figure: dict[str, Any], text: str) -> str:
    """The method's name with the variant that won (threads, batch size, processes)."""
    text = text.replace("K processes", f"{figure['processes']} processes") if "processes" in figure else text
    details = [f"{k.replace('_', ' ')} {figure[k]}" for k in ("batch", "threads", "threads_each") if k in figure]
    return f"{text}; {', '.join(details)}" if details else text


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def markdown(result: dict[str, Any]) -> str:
    m, figures = result["machine"], result["throughput"]
    ectrans = figures["ectrans"]["tasks_per_s"]
    rows = [
        [
            _label(figures[key], text),
            figures[key]["tasks_per_s"],
            figures[key]["tokens_per_s"],
            round(ectrans / figures[key]["tasks_per_s"], 2),
            ", ".join(f"{s:g}" for s in figures[key]["samples"]),
        ]
        for key, text in METHODS
    ]
    memory = result["memory"]
    redis = result["redis_path"]
    lines = [
        f"# Benchmark `baselines`{' (quick)' if result['quick'] else ''}",
        "",
        f"- date: {m['date']}; device: `{m['device']}`; CPU: {m['cpu']} ({m['cores']} cores); "
        f"torch {m['torch']}, transformers {m['transformers']}; git `{m['git']}`",
        f"- command: `{m['command']}`",
        f"- load average at start {m['load_average_at_start']}, at end {m['load_average_at_end']} "
        "(a load above the core count means other work shared the machine: compare ratios, not absolutes)",
        f"- workload: {result['workload']['throughput']}; {result['workload']['tokens_per_task']} tokens per task",
        "",
        "## Throughput (best of interleaved rounds)",
        "",
        markdown_table(["method", "tasks/s", "tokens/s", "ECTrans ×", "rounds (tasks/s)"], rows),
        "",
        f"Median of per-round ratios: {result['median_round_ratios']}.",
        "",
        "## Targets",
        "",
        markdown_table(
            ["figure", "measured", "target", "met"],
            [[name, t["measured"], t["target"], "yes" if t["met"] else "no"] for name, t in result["targets"].items()],
        ),
        "",
        "## ECTrans from 1 to many tasks in flight",
        "",
        markdown_table(
            ["in flight", "tasks", "tasks/s", "server p50 ms", "server p99 ms"],
            [
                [r["in_flight"], r["tasks"], r["tasks_per_s"], r["server_p50_ms"], r["server_p99_ms"]]
                for r in result["in_flight"]
            ],
        ),
        "",
        "## Real-time latency under Poisson load (deadline misses)",
        "",
        markdown_table(
            [
                "load × per-request",
                "rate/s",
                "tasks",
                "deadline ms",
                "ECTrans p50/p99 ms",
                "ECTrans miss",
                "ECTrans, no deadline sent: p50/p99 ms",
                "late",
                "per request p50/p99 ms",
                "per request miss",
            ],
            [
                [
                    r["load_x_per_request"],
                    r["rate_per_s"],
                    r["tasks"],
                    r["deadline_ms"],
                    f"{_ms(r['ectrans']['p50_ms'])} / {_ms(r['ectrans']['p99_ms'])}",
                    f"{r['ectrans']['miss_rate']:.1%} {r['ectrans']['misses'] or ''}",
                    f"{_ms(r['ectrans_no_deadline_sent']['p50_ms'])} / {_ms(r['ectrans_no_deadline_sent']['p99_ms'])}",
                    f"{r['ectrans_no_deadline_sent']['miss_rate']:.1%}",
                    f"{_ms(r['per_request']['p50_ms'])} / {_ms(r['per_request']['p99_ms'])}",
                    f"{r['per_request']['miss_rate']:.1%}",
                ]
                for r in result["realtime"]
            ],
        ),
        "",
        "## Memory",
        "",
        markdown_table(
            ["what", "PSS MiB after load", "PSS MiB after the runs"],
            [
                ["ECTrans (dispatcher + worker)"]
                + [memory[when]["ectrans_pss_mib"]["total_pss_mib"] for when in ("after_load", "after_runs")],
                ["per request (1 process)"]
                + [memory[when]["per_request_pss_mib"] for when in ("after_load", "after_runs")],
                [f"multitask ({figures['multitask']['processes']} processes)"]
                + [memory[when]["multitask_pss_mib"] for when in ("after_load", "after_runs")],
            ],
        ),
        "",
        memory["note"] + ".",
        "",
        "## Redis path (no-op model)",
        "",
        markdown_table(
            ["figure", "value"],
            [
                ["sustained tasks/s (best in-flight level)", redis["tasks_per_s"]],
                [
                    "single task p50 / p99 ms (real-time class)",
                    f"{redis['single_task']['p50_ms']} / {redis['single_task']['p99_ms']}",
                ],
                ["single task p50 ms (batch class, waits for batch-mates)", redis["single_task_batch_class"]["p50_ms"]],
                [
                    "bare XADD→XREADGROUP→XADD p50 / p99 ms",
                    f"{redis['bare_round_trip']['p50_ms']} / {redis['bare_round_trip']['p99_ms']}",
                ],
                ["added by ECTrans, p50 ms", redis["added_latency_p50_ms"]],
            ],
        ),
        "",
        markdown_table(
            ["in flight", "tasks", "tasks/s", "server p50 ms", "server p99 ms"],
            [
                [r["in_flight"], r["tasks"], r["tasks_per_s"], r["server_p50_ms"], r["server_p99_ms"]]
                for r in redis["in_flight"]
            ],
        ),
        "",
        *json_details(result),
    ]
    return "\n".join(lines)


def draw(figure: Any, result: dict[str, Any]) -> None:
    """Four panels: throughput by method, ECTrans by tasks in flight, real-time latency, Redis path."""
    figures = result["throughput"]
    axes = figure.subplots(1, 4)
    names = [SHORT[key] for key, _ in METHODS]
    values = [figures[key]["tasks_per_s"] for key, _ in METHODS]
    bars = axes[0].bar(names, values, color=["#999", "#999", "#bbb", "#555", "#1f77b4"])
    for bar, value in zip(bars, values, strict=True):
        axes[0].annotate(f"{value:.0f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom")
    axes[0].tick_params(axis="x", labelsize=8)
    axes[0].set_title(f"throughput ({result['device']})")
    axes[0].set_ylabel("tasks/s")

    flight = result["in_flight"]
    axes[1].plot([r["in_flight"] for r in flight], [r["tasks_per_s"] for r in flight], "o-", label="ECTrans")
    for key, style, label in (
        ("per_request", ":", "per request"),
        ("multitask", "--", "multitask"),
        ("plain_sorted", "-.", "plain sorted"),
    ):
        axes[1].axhline(figures[key]["tasks_per_s"], linestyle=style, color="gray", label=label)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("tasks in flight")
    axes[1].set_ylabel("tasks/s")
    axes[1].set_title("growth with tasks in flight")
    axes[1].legend(fontsize=7)

    rt = result["realtime"]
    xs = range(len(rt))
    width = 0.13
    series = (("ectrans", "#1f77b4"), ("ectrans_no_deadline_sent", "#17becf"), ("per_request", "#999"))
    for offset, (who, color) in enumerate(series):
        for j, (q, alpha) in enumerate((("p50_ms", 1.0), ("p99_ms", 0.5))):
            pos = [x + (offset * 2 + j - 2.5) * width for x in xs]
            heights = [r[who][q] or 0.0 for r in rt]  # none: every task was rejected
            label = f"{who.replace('_no_deadline_sent', ' (no deadline)')} {q[:3]}"
            axes[2].bar(pos, heights, width, color=color, alpha=alpha, label=label)
    axes[2].axhline(rt[0]["deadline_ms"] if rt else 0, color="red", linewidth=0.8, label="deadline")
    axes[2].set_xticks(
        list(xs),
        [
            f"{r['rate_per_s']:.0f}/s\nmiss {r['ectrans']['miss_rate']:.0%}|{r['per_request']['miss_rate']:.0%}"
            for r in rt
        ],
        fontsize=8,
    )
    axes[2].set_yscale("log")
    axes[2].set_ylabel("latency ms")
    axes[2].set_title("real time under Poisson load")
    axes[2].legend(fontsize=6)

    redis = result["redis_path"]["in_flight"]
    axes[3].plot([r["in_flight"] for r in redis], [r["tasks_per_s"] for r in redis], "o-", color="#2ca02c")
    axes[3].axhline(10_000, color="red", linewidth=0.8, label="target 10k/s")
    axes[3].set_xscale("log")
    axes[3].set_yscale("log")
    axes[3].set_xlabel("tasks in flight")
    axes[3].set_ylabel("tasks/s")
    axes[3].set_title("Redis path (no-op model)")
    axes[3].legend(fontsize=7)
