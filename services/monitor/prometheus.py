"""The Prometheus `/metrics` endpoint: counters and histograms fed entry by entry from the metrics
stream, gauges read from the latest snapshot at scrape time.

The registry belongs to the `Exporter` (not prometheus-client's global one), so a process can run
several monitors. The HTTP server runs on prometheus-client's own thread; the event loop only
increments thread-safe counters and swaps the snapshot reference.
"""

from __future__ import annotations

import logging
import platform
import re
import threading
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ectrans import __version__
from ectrans.services.monitor.instances import LIVE, STALE
from ectrans.services.monitor.report import Snapshot, gpu_by_pid
from ectrans.services.monitor.stats import TaskEntry

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TASK_LABELS = ("model", "class")
BUILD_LABELS = ("version", "python")
INSTANCE_LABELS = ("service", "instance")
# Queues by model and class; the ingress stream (before a model queue) is class `ingress`, model "".
QUEUE_LABELS = ("model", "class")
_MODEL_QUEUE = re.compile(r"q:\{(?P<model>[^}]*)\}:(?P<short>rt|batch)$")


def stream_labels(stream: str) -> list[str]:
    """`[model, class]` of a stream name (`<prefix>q:{minilm}:rt` → `["minilm", "realtime"]`)."""
    found = _MODEL_QUEUE.search(stream)
    if found is None:
        return ["", "ingress"]
    return [found["model"], "realtime" if found["short"] == "rt" else "batch"]


class SnapshotCollector(Collector):
    """Gauges of the latest interval: streams, instances, memory, devices."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.snapshot: Snapshot | None = None

    def collect(self) -> Iterator[Metric]:
        build = GaugeMetricFamily("ectrans_build_info", "The ECTrans version this monitor runs.", labels=BUILD_LABELS)
        build.add_metric([__version__, platform.python_version()], 1)
        yield build
        snap = self.snapshot
        if snap is None:
            return
        yield from self._streams(snap)
        yield from self._instances(snap)
        yield from self._devices(snap)

    def _streams(self, snap: Snapshot) -> Iterator[Metric]:
        figures = {
            "length": "Entries in the stream (not yet finished).",
            "pending": "Entries delivered to a consumer and not yet acknowledged.",
            "lag": "Entries not yet delivered to the consumer group.",
            "consumers": "Consumers in the stream's group.",
        }
        labelled = {stream: stream_labels(stream) for stream in snap.streams}
        for figure, doc in figures.items():
            family = GaugeMetricFamily(f"ectrans_queue_{figure}", doc, labels=QUEUE_LABELS)
            for stream, state in snap.streams.items():
                family.add_metric(labelled[stream], getattr(state, figure))
            yield family
        oldest = GaugeMetricFamily(
            "ectrans_queue_oldest_pending_seconds", "Age of the oldest pending entry.", labels=QUEUE_LABELS
        )
        for stream, state in snap.streams.items():
            if state.oldest_pending_s is not None:
                oldest.add_metric(labelled[stream], state.oldest_pending_s)
        yield oldest
        yield GaugeMetricFamily("ectrans_dead_letters", "Entries in the dead-letter stream.", value=snap.dead_letters)

    def _instances(self, snap: Snapshot) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "ectrans_workers_alive", "Workers with a fresh heartbeat.", value=len(snap.live("worker"))
        )
        up = GaugeMetricFamily(
            "ectrans_instance_up", "1 if the heartbeat is fresh, 0 if stale or gone.", labels=INSTANCE_LABELS
        )
        age = GaugeMetricFamily(
            "ectrans_instance_heartbeat_age_seconds", "Seconds since the last heartbeat.", labels=INSTANCE_LABELS
        )
        uptime = GaugeMetricFamily(
            "ectrans_instance_uptime_seconds", "Seconds since the process started.", labels=INSTANCE_LABELS
        )
        restarts = CounterMetricFamily(
            "ectrans_instance_restarts", "Process restarts seen by this monitor.", labels=INSTANCE_LABELS
        )
        memory = GaugeMetricFamily(
            "ectrans_process_memory_bytes", "Process memory: rss, pss (shared pages split), uss (private).",
            labels=[*INSTANCE_LABELS, "kind"],
        )  # fmt: skip
        gpu_memory = GaugeMetricFamily(
            "ectrans_process_gpu_memory_bytes", "Device memory the process holds.", labels=INSTANCE_LABELS
        )
        gpu = gpu_by_pid(snap, self.host)
        for inst in snap.instances:
            labels = [inst.service, inst.instance]
            if inst.state in (LIVE, STALE):
                up.add_metric(labels, 1 if inst.state == LIVE else 0)
                age.add_metric(labels, inst.age_s(snap.at))
                uptime.add_metric(labels, inst.uptime_s(snap.at))
                for kind, value in sorted(inst.memory.items()):
                    memory.add_metric([*labels, kind], value)
                if inst.pid in gpu:
                    gpu_memory.add_metric(labels, gpu[inst.pid])
            elif inst.state != "stopped":
                up.add_metric(labels, 0)
            restarts.add_metric(labels, inst.restarts)
        yield from (up, age, uptime, restarts, memory, gpu_memory)

    def _devices(self, snap: Snapshot) -> Iterator[Metric]:
        gpus = [d for d in snap.devices if d.device.startswith("cuda")]
        used = GaugeMetricFamily("ectrans_gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=["device"])
        total = GaugeMetricFamily("ectrans_gpu_memory_total_bytes", "GPU memory (NVML).", labels=["device"])
        util = GaugeMetricFamily(
            "ectrans_gpu_utilization_ratio", "Share of time a kernel ran (NVML).", labels=["device"]
        )
        for dev in gpus:
            used.add_metric([dev.device], dev.used_bytes)
            total.add_metric([dev.device], dev.total_bytes)
            util.add_metric([dev.device], dev.utilisation_pct / 100)
        yield from (used, total, util)
        weights = GaugeMetricFamily(
            "ectrans_weights_bytes", "Shared model weights on the device, counted once.", labels=["device"]
        )
        for dev in snap.devices:
            if dev.weights_bytes is not None:
                weights.add_metric([dev.device], dev.weights_bytes)
        yield weights
        for dev in snap.devices:
            if dev.device == "cpu":
                yield GaugeMetricFamily(
                    "ectrans_host_memory_used_bytes", "Host memory in use (total less available).", value=dev.used_bytes
                )
                yield GaugeMetricFamily("ectrans_host_memory_total_bytes", "Host memory.", value=dev.total_bytes)
                yield GaugeMetricFamily(
                    "ectrans_host_cpu_utilization_ratio", "Host CPU busy share.", value=dev.utilisation_pct / 100
                )


class Exporter:
    """Owns the registry, its metrics and (when a port is given) the HTTP server."""

    def __init__(self, host: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.tasks = Counter("ectrans_tasks", "Tasks finished, by outcome.", [*TASK_LABELS, "status"], registry=r)
        self.errors = Counter("ectrans_task_errors", "Error results, by reason.", [*TASK_LABELS, "reason"], registry=r)
        self.deadline_misses = Counter(
            "ectrans_deadline_misses", "Tasks that expired or finished after their deadline.", TASK_LABELS, registry=r
        )
        self.tokens = Counter("ectrans_tokens", "Tokens processed (without padding).", TASK_LABELS, registry=r)
        self.padded = Counter("ectrans_padded_tokens", "Token slots processed (with padding).", TASK_LABELS, registry=r)
        self.latency = Histogram(
            "ectrans_task_latency_seconds", "Submission to result.", TASK_LABELS, buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue = Histogram(
            "ectrans_task_queue_seconds",
            "Submission to the start of its batch.",
            TASK_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.service = Histogram(
            "ectrans_task_service_seconds",
            "Run time of the task's batch.",
            TASK_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "ectrans_batch_size", "Tasks per executed batch.", TASK_LABELS, buckets=BATCH_BUCKETS, registry=r
        )
        self.gauges = SnapshotCollector(host)
        r.register(self.gauges)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def add(self, entry: TaskEntry) -> None:
        labels = (entry.model, entry.task_class)
        if entry.ok:
            self.tasks.labels(*labels, "ok").inc(entry.ok)
        for reason, count in entry.errors.items():
            self.tasks.labels(*labels, "error").inc(count)
            self.errors.labels(*labels, reason).inc(count)
        if entry.deadline_misses:
            self.deadline_misses.labels(*labels).inc(entry.deadline_misses)
        if entry.batch_size:
            self.tokens.labels(*labels).inc(entry.tokens)
            self.padded.labels(*labels).inc(entry.padded_tokens)
            self.batch_size.labels(*labels).observe(entry.batch_size)
            service = self.service.labels(*labels)
            for _ in range(entry.batch_size):
                service.observe(entry.service_ms / 1000)
        for histogram, values in ((self.latency, entry.latencies_ms), (self.queue, entry.queue_ms)):
            if values:  # no empty series for rejections, which never ran
                child = histogram.labels(*labels)
                for value in values:
                    child.observe(value / 1000)

    def update(self, snap: Snapshot) -> None:
        self.gauges.snapshot = snap

    def serve(self, port: int, host: str) -> int:
        """Start `/metrics` on `host:port`; returns the bound port."""
        self._server, self._thread = start_http_server(port, host, registry=self.registry)
        bound: int = self._server.server_port
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
