"""Benchmark scenarios of `ectrans bench <scenario>`; each module has `run(quick: bool) -> dict`."""

SCENARIOS = {
    "baselines": "ectrans.bench.baselines",
    "pipeline": "ectrans.bench.pipeline",
    "memory": "ectrans.bench.memory",
    "mixed": "ectrans.bench.mixed",
    "split": "ectrans.bench.split",
    "chaos": "ectrans.bench.chaos",
    "scale": "ectrans.bench.scale",
    "durability": "ectrans.bench.durability",
    "gateway": "ectrans.bench.gateway",
    "serve": "ectrans.bench.serve",
}
# Scenarios that draw a plot (matplotlib, the `bench` extra): checked before their run starts.
PLOTTED = frozenset({"baselines", "mixed", "split"})
