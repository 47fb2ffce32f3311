"""The gateway's own figures for `GET /metrics`, in a registry of its own (never prometheus-client's
global one, so that tests and benchmarks can run several gateways in one process)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# The `model` label of a name not in the registry: requested names are the client's to choose, and
# one label value per name would grow the gateway (and every scrape) without bound.
UNKNOWN_MODEL = "unknown"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class GatewayMetrics:
    def __init__(self, models: Iterable[str] = ()) -> None:
        self.models = frozenset(models)
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "ectrans_gateway_requests",
            "HTTP requests answered, by endpoint and status code.",
            ("endpoint", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "ectrans_gateway_request_seconds",
            "Time from a request's arrival to the end of its response.",
            ("endpoint",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        # A plain count read at scrape time: only the event loop's thread changes it, so no lock per request.
        self.inflight = 0
        inflight = Gauge("ectrans_gateway_inflight_requests", "Requests being answered.", registry=self.registry)
        inflight.set_function(lambda: self.inflight)
        self.inputs = Counter(
            "ectrans_gateway_inputs", "Inputs submitted as tasks, by model.", ("model",), registry=self.registry
        )
        self.cancelled = Counter(
            "ectrans_gateway_cancelled",
            "Tasks cancelled because their HTTP client disconnected first.",
            registry=self.registry,
        )

        # Label children by label values: `labels()` parses its arguments and takes a lock on every call.
        self._answered: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        self._inputs: dict[str, Counter] = {}

    def answered(self, endpoint: str, status: int, seconds: float) -> None:
        """One request answered: counted by endpoint and status, its time observed by endpoint."""
        children = self._answered.get((endpoint, status))
        if children is None:
            children = (self.requests.labels(endpoint, str(status)), self.latency.labels(endpoint))
            self._answered[(endpoint, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    def submitted(self, model: str, inputs: int) -> None:
        """Inputs submitted for `model`; a model outside the registry is counted as `unknown`."""
        if model not in self.models:
            model = UNKNOWN_MODEL
        child = self._inputs.get(model)
        if child is None:
            child = self._inputs[model] = self.inputs.labels(model)
        child.inc(inputs)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
