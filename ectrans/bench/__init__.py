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
    "serve": "ectrans.bench.serve",
}
