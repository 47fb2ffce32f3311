"""`ectrans bench gateway`: what the HTTP gateway adds, with the no-op model (no model cost).

- one HTTP client, one request at a time: client-side latency of `POST /v1/embeddings` (one input)
  against the same task through the Python client in the same run; the difference is what HTTP and
  the gateway add (the HTTP client's own cost included). `GET /health` at the same time shows HTTP's
  floor: a round trip through uvicorn and FastAPI that touches no Redis;
- closed loops of 1, 32 and 256 HTTP clients, each sending its next request when the last is
  answered: requests/s end to end, latency percentiles and every answer that is not a 200 with the
  right vector, by status.

The stack runs as processes (private Redis, dispatcher, worker, gateway), as `ectrans up` starts
them; the load comes from this process, which shares the machine's cores with them, through a lean
HTTP/1.1 driver (`http_load.py`) so that most of those cores go to what is measured.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from typing import Any

import orjson

from ectrans.bench.harness import ServiceStack, cores, machine_info, note, run_async, size_for
from ectrans.bench.http_load import HttpConnection, request_head
from ectrans.bench.redis_path import CpuMeter, per_task_us
from ectrans.bench.workload import percentile, sample_texts
from ectrans.client import AsyncClient
from ectrans.local.launch import wait_ready
from ectrans.local.redis_server import free_port

MODELS_JSON = '{"noop": {"kind": "noop"}}'
HEALTH_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class GatewaySize:
    single_requests: int
    clients: tuple[int, ...]
    seconds_per_level: float


QUICK = GatewaySize(single_requests=300, clients=(1, 32, 256), seconds_per_level=4.0)
FULL = GatewaySize(single_requests=2000, clients=(1, 32, 256), seconds_per_level=15.0)
TINY = GatewaySize(single_requests=20, clients=(1, 32), seconds_per_level=0.5)  # the smoke test


class GatewayStack(ServiceStack):
    """The bench's service stack plus a gateway process on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        settings = {"MODELS_JSON": MODELS_JSON, "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(self.port)}
        super().__init__(serve_models="noop", settings=settings)
        self.base = f"http://127.0.0.1:{self.port}"

    def launch(self) -> GatewayStack:
        super().launch()
        self._spawn("gateway", "gateway", "bench-g0")
        return self

    def wait_ready(self, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
        super().wait_ready(timeout_s)
        wait_ready(self.processes.values(), self._answers_ready, timeout_s, "the gateway")

    def _answers_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/ready", timeout=1) as answer:
                return bool(answer.status == 200)
        except OSError:  # refused while it starts, or 503 (HTTPError) until a worker serves
            return False


def _summary(latencies_ms: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(latencies_ms, 50), 3),
        "p90_ms": round(percentile(latencies_ms, 90), 3),
        "p99_ms": round(percentile(latencies_ms, 99), 3),
    }


class Http:
    """Where the gateway listens, and the requests the bench sends it."""

    def __init__(self, port: int) -> None:
        self.port = port
        host = f"127.0.0.1:{port}"
        self.embeddings = request_head("POST", "/v1/embeddings", host)
        self.health = request_head("GET", "/health", host, content_type=None)

    async def connect(self) -> HttpConnection:
        return await HttpConnection.connect("127.0.0.1", self.port)


def _outcome(status: int, data: bytes, text: str) -> str:
    """`200` for the right answer (the no-op model's vector: the input's length), else the status and
    the error's code (`429 overloaded`), or `200 wrong` for a 200 with another body."""
    try:
        answer = orjson.loads(data)
        if status == 200:
            return "200" if answer["data"][0]["embedding"] == [len(text)] else "200 wrong"
        return f"{status} {answer['error']['code']}"
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return f"{status} unreadable"


async def _post(connection: HttpConnection, http: Http, text: str, **options: str) -> str:
    status, data = await connection.request(http.embeddings, orjson.dumps({"model": "noop", "input": text, **options}))
    return _outcome(status, data, text)


async def _one_at_a_time(stack: GatewayStack, http: Http, texts: list[str]) -> dict[str, Any]:
    """HTTP, the Python client and /health, interleaved request by request so that a noisy
    neighbour hits all three alike."""
    http_ms: list[float] = []
    python_ms: list[float] = []
    health_ms: list[float] = []
    connection = await http.connect()
    async with AsyncClient(stack.url, prefix=stack.prefix) as client:
        for text in texts:
            started = time.perf_counter()
            outcome = await _post(connection, http, text, priority="realtime")
            http_ms.append((time.perf_counter() - started) * 1000)
            if outcome != "200":
                raise RuntimeError(f"the gateway answered {outcome}")
            started = time.perf_counter()
            result = await client.submit("noop", "noop", text, priority="realtime")
            python_ms.append((time.perf_counter() - started) * 1000)
            result.raise_for_status()
            started = time.perf_counter()
            status, _ = await connection.request(http.health)
            health_ms.append((time.perf_counter() - started) * 1000)
            if status != 200:
                raise RuntimeError(f"/health answered {status}")
    connection.close()
    http_summary, python_summary = _summary(http_ms), _summary(python_ms)
    return {
        "http": http_summary,
        "python_client": python_summary,
        "health": _summary(health_ms),
        "added_p50_ms": round(http_summary["p50_ms"] - python_summary["p50_ms"], 3),
    }


async def _closed_loop(http: Http, texts: list[str], clients: int, seconds: float) -> dict[str, Any]:
    """`clients` loops, each on its own keep-alive connection, each sending its next request once the
    last is answered, for `seconds`."""
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    connections = await asyncio.gather(*(http.connect() for _ in range(clients)))
    stop_at = time.perf_counter() + seconds

    async def one_client(index: int) -> None:
        connection, i = connections[index], index
        while time.perf_counter() < stop_at:
            text = texts[i % len(texts)]
            i += clients
            started = time.perf_counter()
            try:
                if not connection.open:
                    connection = await http.connect()
                statuses[await _post(connection, http, text)] += 1
            except OSError as exc:
                statuses[type(exc).__name__] += 1
                continue
            latencies.append((time.perf_counter() - started) * 1000)
        connection.close()

    started = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for index in range(clients):
            tg.create_task(one_client(index))
    elapsed = time.perf_counter() - started
    answered = sum(statuses.values())
    errors = {status: n for status, n in statuses.items() if status != "200"}
    return {
        "clients": clients,
        "requests": answered,
        "requests_per_s": round(statuses["200"] / elapsed, 1),
        "errors": errors,
        **_summary(latencies),
    }


async def _measure(stack: GatewayStack, size: GatewaySize) -> dict[str, Any]:
    texts = sample_texts(4096, seed=17, mix="short")
    http = Http(stack.port)
    await _closed_loop(http, texts, 32, 1.0)  # warm-up: the token counter, caches
    single = await _one_at_a_time(stack, http, texts[: size.single_requests])
    note(f"gateway: one client adds {single['added_p50_ms']:.2f} ms at p50 over the Python client")
    levels = []
    meter = CpuMeter(stack)
    try:
        for clients in size.clients:
            before = meter.read()
            level = await _closed_loop(http, texts, clients, size.seconds_per_level)
            used = per_task_us(before, meter.read(), max(level["requests"], 1))
            level["cpu_us_per_request"] = {("load" if name == "client" else name): us for name, us in used.items()}
            levels.append(level)
            note(f"gateway: {clients} clients → {level['requests_per_s']:,.0f} requests/s, errors {level['errors']}")
    finally:
        meter.close()
    return {"one_at_a_time": single, "closed_loops": levels}


def _alone(level: dict[str, Any]) -> float:
    """Requests/s the stack would answer with every core to itself, from the CPU it spent per request:
    on a machine shared with other work the measured rate is what the others left over."""
    used: dict[str, float] = level["cpu_us_per_request"]
    return round(cores() * 1e6 / sum(used.values()), 1)


def run(quick: bool) -> dict[str, Any]:
    size = size_for(quick, QUICK, FULL, TINY)
    stack = GatewayStack()
    with stack:
        figures = run_async(lambda: _measure(stack, size))
    best = max(level["requests_per_s"] for level in figures["closed_loops"])
    at_256 = next((level for level in figures["closed_loops"] if level["clients"] == 256), None)
    busiest = max(figures["closed_loops"], key=lambda level: level["clients"])
    return {
        "scenario": "gateway",
        "quick": quick,
        "added_p50_ms_at_1_client": figures["one_at_a_time"]["added_p50_ms"],
        "best_requests_per_s": best,
        "errors_at_256_clients": at_256["errors"] if at_256 else None,
        "gateway_cpu_us_per_request": busiest["cpu_us_per_request"]["gateway"],
        "requests_per_s_alone": _alone(busiest),
        **figures,
        "targets": {"added_p50_ms_at_1_client": 1.0, "errors_at_256_clients": 0, "requests_per_s": 2000},
        "how": (
            "no-op model; private redis-server, dispatcher, worker and gateway processes; load from this process "
            "over HTTP/1.1 keep-alive connections (one per client; responses parsed by httptools, each body checked); "
            "one_at_a_time interleaves HTTP, the Python client and /health request by request, priority realtime; "
            "closed loops send one input per request; cpu_us_per_request: CPU seconds each process spent per "
            "answered request (redis from its INFO); requests_per_s_alone: cores x 1e6 / their sum at the most "
            "clients, a projection for a machine the stack has to itself"
        ),
        "machine": machine_info(),
    }
