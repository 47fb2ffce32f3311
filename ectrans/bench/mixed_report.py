"""The `mixed` scenario's markdown tables, plot and progress lines, drawn from its JSON result alone."""

from __future__ import annotations

from typing import Any

from ectrans.bench.harness import json_details, markdown_table
from ectrans.bench.workload import ratio

ROWS = (("ectrans", "ECTrans"), ("fifo", "FIFO (ECTRANS_FIFO=1)"), ("per_request", "per request (batch 1)"))
SHORT = {"ectrans": "ECTrans", "fifo": "FIFO", "per_request": "per request"}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _yes(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def summary_line(system: dict[str, Any]) -> str:
    """One system's figures in a line, for the progress notes."""
    mixed = system["mixed"]
    return (
        f"real time loaded p50/p99 {mixed['p50_ms']}/{mixed['p99_ms']} ms, deadline misses "
        f"{mixed['deadline_miss_rate']}, batch {system['batch_only']['tasks_per_s']}/s alone, "
        f"{mixed['batch_tasks_per_s']}/s mixed; {system['elapsed_s']} s"
    )


def markdown(result: dict[str, Any]) -> str:
    m, systems, config = result["machine"], result["systems"], result["config"]
    rows = []
    for key, name in ROWS:
        system = systems[key]
        idle = system.get("idle")
        rows.append(
            [
                name,
                f"{_ms(idle['p50_ms'])} / {_ms(idle['p99_ms'])}" if idle else "-",
                f"{_ms(system['mixed']['p50_ms'])} / {_ms(system['mixed']['p99_ms'])}",
                _pct(system["mixed"]["deadline_miss_rate"]),
                system["batch_only"]["tasks_per_s"],
                system["mixed"]["batch_tasks_per_s"],
                ratio(system["mixed"]["batch_tasks_per_s"], system["batch_only"]["tasks_per_s"]),
            ]
        )
    headers = ["system", "rt idle p50 / p99 ms", "rt loaded p50 / p99 ms", "deadline miss", "batch alone /s",
               "batch mixed /s", "ratio"]  # fmt: skip
    batch_target = result["batch_throughput_ratio_target"]
    targets = [
        ["rt p99 loaded ≤ 1.5 × idle p99 + one segment", result["rt_p99_ms_loaded"], result["rt_p99_target_ms"],
         _yes(result["meets_rt_target"])],
        ["the same, one segment measured (batch completion interval)", result["rt_p99_ms_loaded"],
         result["rt_p99_target_ms_measured_segment"], _yes(result["meets_rt_target_measured_segment"])],
        [f"batch throughput mixed / alone ≥ {batch_target}", result["batch_throughput_ratio"], batch_target,
         _yes(result["meets_batch_target"])],
        ["lost tasks = 0", result["lost"], 0, _yes(result["lost"] == 0)],
    ]  # fmt: skip
    seconds = ", ".join(f"{SHORT[key]} {systems[key]['elapsed_s']}" for key, _ in ROWS)
    lines = [
        f"# Benchmark `mixed`{' (quick)' if result['quick'] else ''}",
        "",
        f"- date: {m['date']}; device: `{m['device']}`; CPU: {m['cpu']} ({m['cores']} cores); "
        f"torch {m['torch']}, transformers {m['transformers']}; git `{m['git']}`",
        f"- command: `{m['command']}`; {result['elapsed_s']} s (start {result['start_s']}, {seconds})",
        f"- load average at start {m['load_average_at_start']}, at end {m['load_average_at_end']}",
        f"- real time: {config['workload']['realtime_mixed']}; deadline {config['deadline_ms']} ms: "
        f"{config['deadline_rule']}",
        f"- batch: {config['workload']['batch']}",
        f"- per request: {systems['per_request']['threads']['chosen']} torch threads (the faster of all cores and "
        f"one, ms per long task: {systems['per_request']['threads']['calibration_ms_per_task']})",
        f"- one segment of the largest batch: {_ms(result['one_segment_ms'])} ms (cost model), batch completions "
        f"every {_ms(result['batch_interval_ms'])} ms (median, batch only)",
        "",
        markdown_table(headers, rows),
        "",
        markdown_table(["target", "measured", "target", "met"], targets),
        "",
        "Every task counted by its id (result hash after the drain; replies read by the client):",
        "",
        markdown_table(
            ["system", "submitted", "ok", "error (reasons)", "lost", "duplicates"],
            [_count_row(name, systems[key]["tasks"]) for key, name in ROWS if "tasks" in systems[key]],
        ),
        "",
        *json_details(result),
    ]
    return "\n".join(lines)


def _count_row(name: str, tasks: dict[str, Any]) -> list[Any]:
    reasons = ", ".join(f"{k} {v}" for k, v in tasks["error_reasons"].items())
    error = f"{tasks['error']} ({reasons})" if reasons else tasks["error"]
    return [name, tasks["submitted"], tasks["ok"], error, tasks["lost"], tasks["duplicates"]]


def draw(figure: Any, result: dict[str, Any]) -> None:
    """Three panels: real-time p50/p99 per system and load, their latency CDFs, batch throughput."""
    systems = result["systems"]
    axes = figure.subplots(1, 3)
    bars = [(f"{SHORT[key]}\nidle", systems[key]["idle"]) for key in ("ectrans", "per_request")]
    bars += [(f"{SHORT[key]}\nloaded", systems[key]["mixed"]) for key, _ in ROWS]
    xs = range(len(bars))
    for offset, (q, alpha) in enumerate((("p50_ms", 1.0), ("p99_ms", 0.5))):
        heights = [summary[q] or 0.0 for _, summary in bars]
        axes[0].bar([x + (offset - 0.5) * 0.38 for x in xs], heights, 0.38, alpha=alpha, color="#1f77b4", label=q[:3])
    if result["rt_p99_target_ms"]:
        axes[0].axhline(result["rt_p99_target_ms"], color="red", linewidth=0.8, label="p99 target")
    axes[0].axhline(result["config"]["deadline_ms"], color="gray", linestyle=":", linewidth=0.8, label="deadline")
    axes[0].set_xticks(list(xs), [label for label, _ in bars], fontsize=8)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("real-time latency ms")
    axes[0].set_title(f"real time ({result['device']})")
    axes[0].legend(fontsize=7)

    for label, summary in bars:
        values = summary["latencies_ms"]
        if values:
            axes[1].step(values, [(i + 1) / len(values) for i in range(len(values))], where="post",
                         label=label.replace("\n", " "))  # fmt: skip
    axes[1].set_xscale("log")
    axes[1].set_xlabel("real-time latency ms")
    axes[1].set_ylabel("fraction of tasks")
    axes[1].set_title("latency CDF")
    axes[1].legend(fontsize=7)

    names = [SHORT[key] for key, _ in ROWS]
    alone = [systems[key]["batch_only"]["tasks_per_s"] or 0.0 for key, _ in ROWS]
    mixed = [systems[key]["mixed"]["batch_tasks_per_s"] or 0.0 for key, _ in ROWS]
    axes[2].bar([x - 0.2 for x in range(len(names))], alone, 0.4, color="#999", label="batch only")
    axes[2].bar([x + 0.2 for x in range(len(names))], mixed, 0.4, color="#1f77b4", label="mixed")
    axes[2].set_xticks(range(len(names)), names)
    axes[2].set_ylabel("batch tasks/s")
    axes[2].set_title("batch throughput")
    axes[2].legend(fontsize=7)
