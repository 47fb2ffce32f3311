"""The pipelined executor: order, per-input errors, failure isolation, real-time cut-in, shutdown.

Mechanics are driven by small segments that record what ran and can block on an event, so every
ordering below is forced by synchronisation, never by sleeping; results are checked on a real
(tiny, random-weight) BERT against the unsplit model.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from ectrans.common.registry import ModelSpec, build_spec
from ectrans.common.schemas import Task
from ectrans.models.alone import AloneThreads
from ectrans.models.api import ItemResult, Paced, Request
from ectrans.models.batch import Job
from ectrans.models.encoder import EncoderTokenizer, Pooling, embed_unsplit
from ectrans.models.loader import load_executor, load_model
from ectrans.models.noop import NoopExecutor
from ectrans.models.pipeline import BoundaryEvent, PipelinedExecutor
from ectrans.models.segments import SegmentState
from ectrans.services.worker.batcher import Pending
from ectrans.services.worker.lanes import ModelLane
from ectrans.services.worker.settings import WorkerSettings
from tests.tiny_encoders import SENTENCES, make_tiny_bert, one_torch_thread

WAIT_S = 20.0


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


STEPS_SPEC = ModelSpec(name="steps", path=Path(), kind="encoder", model_type="test", ops=frozenset({"embed", "noop"}))


class CharTokenize:
    """One token per character; refuses texts containing 'bad' (to test per-input isolation)."""

    def __call__(self, texts: list[str], params: dict[str, Any]) -> SegmentState:
        if any("bad" in text for text in texts):
            raise ValueError("'bad' cannot be tokenised")
        width = max(len(text) for text in texts)
        ids = torch.zeros(len(texts), width, dtype=torch.long)
        mask = torch.zeros(len(texts), width, dtype=torch.long)
        for row, text in enumerate(texts):
            ids[row, : len(text)] = torch.tensor([ord(c) for c in text])
            mask[row, : len(text)] = 1
        return SegmentState(hidden=None, mask=mask, input_ids=ids, params=dict(params), extras={"texts": texts})

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(text) for text in texts]


class Step:
    """A segment that logs (name, first text), adds 1 to the hidden state, may block on `gate`
    while running a batch whose first text is `block_on`, and fails on a text containing 'boom'."""

    def __init__(self, name: str, log: list[tuple[str, str]], *, last: bool = False) -> None:
        self.name = name
        self.layers: tuple[int, ...] = ()
        self.log = log
        self.last = last
        self.block_on: str | None = None
        self.entered = threading.Event()
        self.gate = threading.Event()

    def __call__(self, state: SegmentState) -> SegmentState:
        texts: list[str] = state.extras["texts"]
        self.log.append((self.name, texts[0]))
        if texts[0] == self.block_on:
            self.entered.set()
            assert self.gate.wait(WAIT_S), "test gate never opened"
        if any("boom" in text for text in texts):
            raise ValueError("boom")
        base = state.hidden if state.hidden is not None else torch.zeros((*state.input_ids.shape, 4))
        state.hidden = base + 1
        if self.last:
            state.outputs = [f"{text}:{int(state.hidden[0, 0, 0])}" for text in texts]
        return state


@pytest.fixture
def log() -> list[tuple[str, str]]:
    return []


def steps_executor(log: list[tuple[str, str]], n: int = 2, **kwargs: Any) -> PipelinedExecutor:
    steps = [Step(chr(ord("A") + i), log, last=i == n - 1) for i in range(n)]
    return PipelinedExecutor(STEPS_SPEC, steps, CharTokenize(), **kwargs)


def step(executor: PipelinedExecutor, index: int) -> Step:
    segment = executor.segments[index]
    assert isinstance(segment, Step)
    return segment


# -- real-time cut-in ------------------------------------------------------------------------


@pytest.mark.parametrize("realtime", [True, False])
def test_waiting_realtime_batch_runs_at_the_next_boundary(log: list[tuple[str, str]], realtime: bool) -> None:
    """Cut-in, the GPU's way (run here on the CPU)."""
    events: list[tuple[BoundaryEvent, int]] = []
    made: list[PipelinedExecutor] = []
    executor = steps_executor(
        log, realtime_lane=False, between_segments=lambda e: events.append((e, made[0].parked_bytes))
    )
    made.append(executor)
    first = step(executor, 0)
    first.block_on = "big"
    big = executor.submit(Request("embed", ["big", "batch"]))
    assert first.entered.wait(WAIT_S)  # segment A is running the big batch
    small = executor.submit(Request("embed", ["rt"], realtime=realtime))
    first.gate.set()
    assert small.result(WAIT_S)[0][0].output == "rt:2"
    assert big.result(WAIT_S)[0][1].output == "batch:2"
    executor.close()
    if realtime:
        # The big batch finished segment A, was parked in front of B; the real-time one overtook it.
        assert log == [("A", "big"), ("A", "rt"), ("B", "rt"), ("B", "big")]
        parks = [(e.stage, e.job, held) for e, held in events if e.action == "park"]
        assert parks == [(1, 0, parks[0][2])] and parks[0][2] > 0
        assert [e.job for e, _ in events if e.action == "resume"] == [0]
    else:
        assert log.index(("B", "big")) < log.index(("B", "rt"))
        assert not [e for e, _ in events if e.action != "run"]
    assert executor.parked_bytes == 0 and executor.realtime_in_flight == 0


def test_on_a_cpu_realtime_batches_run_beside_a_running_segment(log: list[tuple[str, str]]) -> None:
    """The real-time lane: a real-time batch does not wait for the bulk segment that runs now, and
    bulk batches never park for it (they would idle a core)."""
    events: list[BoundaryEvent] = []
    executor = steps_executor(log, between_segments=events.append)
    assert executor.realtime_lane  # the CPU's default
    first = step(executor, 0)
    first.block_on = "big"
    big = executor.submit(Request("embed", ["big"]))
    behind = executor.submit(Request("embed", ["next"]))
    assert first.entered.wait(WAIT_S)  # segment A holds the big batch until the gate opens
    rt = executor.submit(Request("embed", ["rt"], realtime=True))
    assert rt.result(WAIT_S)[0][0].output == "rt:2"  # answered while A still runs the big batch
    assert not big.done() and executor.realtime_in_flight == 0
    first.gate.set()
    assert big.result(WAIT_S)[0][0].output == "big:2" and behind.result(WAIT_S)[0][0].output == "next:2"
    executor.close()
    assert all(e.action == "run" for e in events) and executor.parked_bytes == 0
    assert [e.stage for e in events if e.realtime] == [0, 1]  # both of its segments, on its own thread


def test_parking_is_bounded_by_bytes(log: list[tuple[str, str]]) -> None:
    events: list[BoundaryEvent] = []
    executor = steps_executor(log, realtime_lane=False, park_limit_bytes=0, between_segments=events.append)
    first = step(executor, 0)
    first.block_on = "big"
    big = executor.submit(Request("embed", ["big"]))
    assert first.entered.wait(WAIT_S)
    small = executor.submit(Request("embed", ["rt"], realtime=True))
    first.gate.set()
    small.result(WAIT_S)
    big.result(WAIT_S)
    executor.close()
    # Over the limit nothing parks: every boundary decision is "run". (Which of the two stage B takes
    # first depends on thread timing: when both wait in its inbox, real-time goes first by design.)
    assert all(e.action == "run" for e in events)
    assert executor.parked_bytes == 0
    assert {entry for entry in log if entry[0] == "B"} == {("B", "big"), ("B", "rt")}


@pytest.mark.parametrize("lane", [False, True], ids=["cut-in", "lane"])
def test_parked_batches_resume_from_their_activations(tiny_bert: Path, lane: bool) -> None:
    """Real-time and batch work interleaved on a real model, cutting in or on their own thread
    beside the pipeline's: every result equals the unsplit one."""
    spec = build_spec("tiny-bert", {"path": str(tiny_bert)})
    executor = load_executor(spec, device="cpu", threads=1, segments=4, queue_depth=1, realtime_lane=lane)
    batches = [SENTENCES[i : i + 3] for i in range(len(SENTENCES))] * 3
    futures = [executor.submit(Request("embed", b, realtime=i % 4 == 1)) for i, b in enumerate(batches)]
    expected = reference_embeddings(tiny_bert, SENTENCES)
    for batch, future in zip(batches, futures, strict=True):
        results, _ = future.result(WAIT_S)
        for text, result in zip(batch, results, strict=True):
            np.testing.assert_allclose(result.output, expected[text], atol=1e-5)
    executor.close()


@pytest.mark.parametrize("lane", [False, True], ids=["cut-in", "lane"])
def test_many_mixed_batches_all_complete(log: list[tuple[str, str]], lane: bool) -> None:
    """Shallow inboxes and many stages: real-time work overtaking batches in every pattern of a
    seeded sequence leaves no batch stranded (lost wake-ups would hang here)."""
    rng = np.random.default_rng(0)
    executor = steps_executor(log, n=4, queue_depth=1, realtime_lane=lane)
    flags = rng.random(1000) < 0.3
    futures = [executor.submit(Request("embed", [f"t{i}"], realtime=bool(rt))) for i, rt in enumerate(flags)]
    outputs = [future.result(WAIT_S)[0][0].output for future in futures]
    executor.close()
    assert outputs == [f"t{i}:4" for i in range(len(flags))]
    assert executor.parked_bytes == 0


# -- results, errors, isolation ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert")


def reference_embeddings(path: Path, texts: list[str]) -> dict[str, np.ndarray[Any, Any]]:
    spec = build_spec("tiny-bert", {"path": str(path)})
    model = load_model(spec, torch.device("cpu"))
    tokenize = EncoderTokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True), spec.max_tokens)
    with torch.inference_mode():
        rows = embed_unsplit(model, tokenize(texts, {}), Pooling()).numpy()
    return dict(zip(texts, rows, strict=True))


@pytest.fixture(scope="module")
def bert_executor(tiny_bert: Path) -> Iterator[PipelinedExecutor]:
    executor = load_executor(build_spec("tiny-bert", {"path": str(tiny_bert)}), device="cpu", threads=1, segments=3)
    assert isinstance(executor, PipelinedExecutor)
    yield executor
    executor.close()


def test_results_in_order_and_equal_to_the_unsplit_model(tiny_bert: Path, bert_executor: PipelinedExecutor) -> None:
    assert [s.name for s in bert_executor.segments] == ["embed+layers0-0", "layers1-1", "layers2-3+pool"]
    expected = reference_embeddings(tiny_bert, SENTENCES)
    batches = [SENTENCES[i:] + SENTENCES[:i] for i in range(len(SENTENCES))]
    futures = [bert_executor.submit(Request("embed", batch)) for batch in batches]
    for batch, future in zip(batches, futures, strict=True):
        results, stats = future.result(WAIT_S)
        assert len(results) == len(batch)
        for text, result in zip(batch, results, strict=True):
            assert result.error is None and result.output.dtype == np.float32
            np.testing.assert_allclose(result.output, expected[text], atol=1e-5)
        limit = bert_executor.spec.max_tokens  # counts mark over-long texts with limit + 1; batches are cut
        counts = [min(count, limit) for count in bert_executor.count_tokens(batch)]
        assert (stats.batch_size, stats.tokens, stats.padded_tokens) == (
            len(batch),
            sum(counts),
            len(batch) * max(counts),
        )
        assert stats.service_ms > 0


def test_bad_inputs_fail_alone(tiny_bert: Path, bert_executor: PipelinedExecutor) -> None:
    inputs: list[Any] = ["", SENTENCES[0], 7, "   ", SENTENCES[2]]
    results, stats = bert_executor.submit(Request("embed", inputs)).result(WAIT_S)
    assert [r.error for r in results] == ["empty input", None, "input must be a string, not int", "empty input", None]
    expected = reference_embeddings(tiny_bert, [SENTENCES[0], SENTENCES[2]])
    np.testing.assert_allclose(results[1].output, expected[SENTENCES[0]], atol=1e-5)
    np.testing.assert_allclose(results[4].output, expected[SENTENCES[2]], atol=1e-5)
    assert stats.batch_size == 5 and stats.tokens == sum(bert_executor.count_tokens([SENTENCES[0], SENTENCES[2]]))
    only_bad, stats = bert_executor.submit(Request("embed", ["", " "])).result(WAIT_S)
    assert [r.error for r in only_bad] == ["empty input", "empty input"] and stats.tokens == 0


def test_untokenisable_input_fails_alone(log: list[tuple[str, str]]) -> None:
    executor = steps_executor(log)
    results, _ = executor.submit(Request("embed", ["fine", "bad one", "also fine"])).result(WAIT_S)
    executor.close()
    assert [r.output for r in results] == ["fine:2", None, "also fine:2"]
    assert results[1].error is not None and "cannot prepare input: 'bad' cannot be tokenised" in results[1].error


def test_a_failing_segment_fails_only_its_batch(log: list[tuple[str, str]]) -> None:
    executor = steps_executor(log, n=3)
    futures = [
        executor.submit(Request("embed", ["one"])),
        executor.submit(Request("embed", ["boom"], realtime=True)),
        executor.submit(Request("embed", ["two"])),
    ]
    assert futures[0].result(WAIT_S)[0][0].output == "one:3"
    with pytest.raises(RuntimeError, match="segment 'A' of model 'steps' failed: ValueError"):
        futures[1].result(WAIT_S)
    assert futures[2].result(WAIT_S)[0][0].output == "two:3"
    assert executor.realtime_in_flight == 0  # the failed real-time batch no longer holds batches back
    executor.close()


def test_wrong_op_fails_the_batch_and_noop_needs_no_model(log: list[tuple[str, str]]) -> None:
    executor = steps_executor(log)
    with pytest.raises(ValueError, match="does not serve op 'translate'"):
        executor.submit(Request("translate", ["x"])).result(WAIT_S)
    results, stats = executor.submit(Request("noop", ["abc", ""])).result(WAIT_S)
    executor.close()
    assert [r.output for r in results] == [{"chars": 3}, {"chars": 0}] and stats.batch_size == 2
    assert log == []


def test_cancelled_batch_is_skipped(log: list[tuple[str, str]]) -> None:
    executor = steps_executor(log)
    first = step(executor, 0)
    first.block_on = "hold"
    held = executor.submit(Request("embed", ["hold"]))
    assert first.entered.wait(WAIT_S)
    dropped = executor.submit(Request("embed", ["dropped"]))
    later = executor.submit(Request("embed", ["later"]))
    assert dropped.cancel()
    first.gate.set()
    assert later.result(WAIT_S)[0][0].output == "later:2"
    assert held.result(WAIT_S)[0][0].output == "hold:2"
    executor.close()
    assert all(text != "dropped" for _, text in log)


def test_close_drains_then_refuses(log: list[tuple[str, str]]) -> None:
    executor = steps_executor(log, n=3, queue_depth=1)
    futures = [executor.submit(Request("embed", [f"t{i}"], realtime=i == 3)) for i in range(8)]
    executor.close()
    assert all(f.done() for f in futures)
    assert [f.result()[0][0].output for f in futures] == [f"t{i}:3" for i in range(8)]
    assert not [t for t in threading.enumerate() if t.name.startswith("ectrans-steps-")]
    with pytest.raises(RuntimeError, match="closed"):
        executor.submit(Request("embed", ["late"])).result(WAIT_S)


# -- the no-op executor ----------------------------------------------------------------------


def test_noop_executor() -> None:
    spec = build_spec("noop", {"kind": "noop"})
    executor = load_executor(spec)
    assert isinstance(executor, NoopExecutor)
    inputs: list[Any] = ["hello", "", 3]
    results, stats = executor.submit(Request("noop", inputs)).result(WAIT_S)
    assert [r.output for r in results] == [{"chars": 5}, {"chars": 0}, None]
    assert results[2].error is not None
    assert (stats.batch_size, stats.tokens) == (3, 1)
    with pytest.raises(ValueError, match="op 'embed'"):
        executor.submit(Request("embed", ["x"])).result(WAIT_S)
    executor.close()
    with pytest.raises(RuntimeError, match="closed"):
        executor.submit(Request("noop", ["x"])).result(WAIT_S)


# -- CUDA --------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_streams_give_the_cpu_results(tiny_bert: Path) -> None:
    spec = build_spec("tiny-bert", {"path": str(tiny_bert)})
    expected = reference_embeddings(tiny_bert, SENTENCES)
    executor = load_executor(spec, device="cuda", segments=4)
    batches = [SENTENCES[i:] + SENTENCES[:i] for i in range(len(SENTENCES))] * 4
    futures = [executor.submit(Request("embed", b, realtime=i % 5 == 2)) for i, b in enumerate(batches)]
    for batch, future in zip(batches, futures, strict=True):
        for text, result in zip(batch, future.result(WAIT_S)[0], strict=True):
            np.testing.assert_allclose(result.output, expected[text], atol=1e-4)
    executor.close()


# -- pacing ----------------------------------------------------------------------------------


def test_pacing_reports_the_first_segment(log: list[tuple[str, str]]) -> None:
    """Bulk batches not yet started by the first segment are counted; the one it runs is named with
    its padded tokens; each start and each end calls back. Real-time batches are not paced."""
    executor = steps_executor(log)
    assert isinstance(executor, Paced)
    calls: list[int] = []
    stop = executor.on_progress(lambda: calls.append(executor.bulk_waiting()))
    first = step(executor, 0)
    first.block_on = "big"
    big = executor.submit(Request("embed", ["big", "xx"]))
    assert first.entered.wait(WAIT_S)  # segment A runs the big batch
    rest = [executor.submit(Request("embed", [f"b{i}"])) for i in range(2)]
    rt = executor.submit(Request("embed", ["rt"], realtime=True))
    front = executor.front_segment()
    assert front is not None and front.padded_tokens == 2 * 3 and front.share == 0.5  # of two segments
    assert executor.bulk_waiting() == 2 and calls == [0]
    first.gate.set()
    for future in [big, *rest, rt]:
        future.result(WAIT_S)
    stop()
    executor.close()
    # big starts (none waiting yet), leaves (two wait), then each of the rest starts and leaves
    assert calls == [0, 2, 1, 1, 0, 0] and executor.bulk_waiting() == 0 and executor.front_segment() is None


# -- alone on the CPU --------------------------------------------------------------------------


class Probe(Step):
    """A Step that also notes which thread ran it, on how many torch threads."""

    def __init__(self, name: str, log: list[tuple[str, str]], seen: list[tuple[str, str, str, int]], **kw: Any) -> None:
        super().__init__(name, log, **kw)
        self.seen = seen

    def __call__(self, state: SegmentState) -> SegmentState:
        texts: list[str] = state.extras["texts"]
        self.seen.append((self.name, texts[0], threading.current_thread().name, torch.get_num_threads()))
        return super().__call__(state)


def all_threads_win(win: bool = True) -> AloneThreads:
    """A choice that runs lone batches on all threads (or on their stages' own), never the other way."""
    choice = AloneThreads(probe_after_s=float("inf"))
    choice.current = win
    return choice


def test_a_lone_batch_keeps_its_stage_threads_where_those_cost_less(log: list[tuple[str, str]]) -> None:
    """Where all threads measured dearer (other processes hold cores), a lone batch runs down the
    pipeline on each stage's own threads, and its first segment's time is what is measured."""
    seen: list[tuple[str, str, str, int]] = []
    steps = [Probe(name, log, seen, last=name == "C") for name in "ABC"]
    executor = PipelinedExecutor(STEPS_SPEC, steps, CharTokenize(), threads=3)
    executor.alone_threads = choice = all_threads_win(False)
    try:
        assert executor.submit(Request("embed", ["solo"])).result(WAIT_S)[0][0].output == "solo:3"
    finally:
        executor.close()
    assert seen == [(name, "solo", f"ectrans-steps-{name}", 1) for name in "ABC"]
    assert len(choice.recent.observations) == 1  # its first segment, measured


def test_a_probe_of_all_threads_runs_only_the_first_segment_on_them(log: list[tuple[str, str]]) -> None:
    """Where one thread is the current way, a probe of all threads measures the first segment on them
    and sends the rest down the pipeline (on a busy host, all of it the slow way would cost more)."""
    seen: list[tuple[str, str, str, int]] = []
    steps = [Probe(name, log, seen, last=name == "C") for name in "ABC"]
    executor = PipelinedExecutor(STEPS_SPEC, steps, CharTokenize(), threads=3)
    executor.alone_threads = choice = AloneThreads(probe_after_s=0.0)
    choice.current = False
    for tokens in range(1, 9):  # a fit of the current way, so that a probe is due
        choice.recent.observe(tokens, 2.0 * tokens)
    try:
        assert executor.submit(Request("embed", ["solo"])).result(WAIT_S)[0][0].output == "solo:3"
    finally:
        executor.close()
    assert seen == [("A", "solo", "ectrans-steps-A", 3), *((n, "solo", f"ectrans-steps-{n}", 1) for n in "BC")]


def test_a_stage_keeps_its_own_thread_count(log: list[tuple[str, str]]) -> None:
    """torch sets a thread's count once, at its first parallel operation, to the count set last in any
    thread: a one-segment pipeline on 2 threads must still run on 2 after its tokenise and results
    stages (1 thread each) have started, not on their 1 (found: MiniLM at 1.6x its bare time)."""
    seen: list[tuple[str, str, str, int]] = []
    executor = PipelinedExecutor(STEPS_SPEC, [Probe("A", log, seen, last=True)], CharTokenize(), threads=2)
    try:
        assert executor.stage_threads == 2
        assert executor.submit(Request("embed", ["solo"])).result(WAIT_S)[0][0].output == "solo:1"
    finally:
        executor.close()
    assert [threads for *_, threads in seen] == [2]


def test_a_lone_batch_runs_every_segment_on_all_threads(log: list[tuple[str, str]]) -> None:
    """Alone in the pipeline, a batch runs all segments in the first one's thread on all threads;
    a batch arriving meanwhile sends it down the pipeline at the next boundary."""
    seen: list[tuple[str, str, str, int]] = []
    steps = [Probe(name, log, seen, last=name == "C") for name in "ABC"]
    executor = PipelinedExecutor(STEPS_SPEC, steps, CharTokenize(), threads=3)
    assert executor.run_alone and executor.stage_threads == 1
    executor.alone_threads = all_threads_win()
    assert executor.submit(Request("embed", ["solo"])).result(WAIT_S)[0][0].output == "solo:3"
    first = "ectrans-steps-A"
    assert seen == [(name, "solo", first, 3) for name in "ABC"]
    seen.clear()
    steps[0].block_on = "big"
    big = executor.submit(Request("embed", ["big"]))
    assert steps[0].entered.wait(WAIT_S)  # A runs the big batch, alone so far
    other = executor.submit(Request("embed", ["other"]))
    deadline = time.monotonic() + WAIT_S
    while not executor._stages[1].batch:  # tokenised and waiting for segment A
        assert time.monotonic() < deadline
        time.sleep(0.001)
    steps[0].gate.set()
    assert big.result(WAIT_S)[0][0].output == "big:3" and other.result(WAIT_S)[0][0].output == "other:3"
    executor.close()
    assert ("A", "big", first, 3) in seen
    assert ("B", "big", "ectrans-steps-B", 1) in seen and ("C", "big", "ectrans-steps-C", 1) in seen
    assert seen.index(("A", "other", first, 1)) > seen.index(("A", "big", first, 3))


def test_work_held_back_by_the_worker_keeps_a_batch_on_its_stage_threads(log: list[tuple[str, str]]) -> None:
    """Tasks the worker holds for the next batch (pacing hands them over once the first segment is
    free) are work on its way: a batch then runs down the pipeline on its stages' own threads instead
    of alone, and one that started alone leaves its lone run at the next boundary when some arrive
    (found: under 32 closed-loop clients every batch ran alone, one after another, and the pipeline
    never filled: 0.69 of the bare loop)."""
    seen: list[tuple[str, str, str, int]] = []
    steps = [Probe(name, log, seen, last=name == "C") for name in "ABC"]
    executor = PipelinedExecutor(STEPS_SPEC, steps, CharTokenize(), threads=3)
    executor.alone_threads = all_threads_win()
    backlog = [3]
    executor.watch_backlog(lambda: backlog[0])
    progress = threading.Event()
    executor.on_progress(progress.set)
    try:
        assert executor.submit(Request("embed", ["held"])).result(WAIT_S)[0][0].output == "held:3"
        assert seen == [(name, "held", f"ectrans-steps-{name}", 1) for name in "ABC"]
        seen.clear()
        backlog[0] = 0
        steps[0].block_on = "solo"
        solo = executor.submit(Request("embed", ["solo"]))
        assert steps[0].entered.wait(WAIT_S)  # alone, on all threads, so far
        backlog[0] = 1
        progress.clear()
        steps[0].gate.set()
        assert solo.result(WAIT_S)[0][0].output == "solo:3"
        assert progress.wait(WAIT_S)  # the first segment freed early: the worker hears of it
    finally:
        executor.close()
    assert seen == [("A", "solo", "ectrans-steps-A", 3), *((n, "solo", f"ectrans-steps-{n}", 1) for n in "BC")]


def test_a_failing_backlog_count_leaves_the_stage_running(log: list[tuple[str, str]]) -> None:
    """A broken count from the worker is logged; the batch runs as if none were held back."""
    steps = [Step(name, log, last=name == "B") for name in "AB"]
    executor = PipelinedExecutor(STEPS_SPEC, steps, CharTokenize(), threads=2)

    def broken() -> int:
        raise RuntimeError("boom")

    executor.watch_backlog(broken)
    try:
        assert executor.submit(Request("embed", ["x"])).result(WAIT_S)[0][0].output == "x:2"
    finally:
        executor.close()


def test_tasks_held_back_without_a_free_batch_slot_leave_a_lone_batch_alone(log: list[tuple[str, str]]) -> None:
    """Queued bulk tasks are work on its way only while the worker has a batch slot to hand them over
    in: with every slot taken (here the one slot, by the lone batch itself) they wait for a batch to
    end, so the batch keeps all threads (found: with `max_inflight_batches=1` every batch ran on its
    stage's threads, one after another, the pipeline never filling); a batch being formed counts."""
    seen: list[tuple[str, str, str, int]] = []
    steps = [Probe(name, log, seen, last=name == "B") for name in "AB"]
    executor = PipelinedExecutor(STEPS_SPEC, steps, CharTokenize(), threads=2)
    executor.alone_threads = all_threads_win()
    try:
        lane = ModelLane(STEPS_SPEC, executor, WorkerSettings(max_inflight_batches=1, device="cpu"))
        task = Task(id="t", model="steps", op="embed", input="queued", submitted_ms=1, task_class="batch")
        lane.batcher.add(Pending("1-0", "stream", task, 6, time.monotonic()))
        lane.inflight["batch"] = 1  # the batch below holds the one slot
        assert executor.submit(Request("embed", ["solo"])).result(WAIT_S)[0][0].output == "solo:2"
        assert seen == [("A", "solo", "ectrans-steps-A", 2), ("B", "solo", "ectrans-steps-A", 2)]
        seen.clear()
        lane.limits["batch"] = 2  # a free slot: the queued task is handed over once the segment is free
        assert executor.submit(Request("embed", ["two"])).result(WAIT_S)[0][0].output == "two:2"
        assert seen == [("A", "two", "ectrans-steps-A", 1), ("B", "two", "ectrans-steps-B", 1)]
        seen.clear()
        lane.batcher.take_all()
        lane.bulk_forming = 1  # taken from the queue, on its way to the executor
        assert executor.submit(Request("embed", ["three"])).result(WAIT_S)[0][0].output == "three:2"
        assert seen == [("A", "three", "ectrans-steps-A", 1), ("B", "three", "ectrans-steps-B", 1)]
    finally:
        executor.close()


def test_a_lone_batch_skips_the_hand_over_to_an_idle_results_stage(
    log: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lone client's latency: the thread that ran every segment also collects the results."""
    collected_in: list[str] = []
    collect = Job.collect

    def recording(job: Job) -> list[ItemResult]:
        collected_in.append(threading.current_thread().name)
        return collect(job)

    monkeypatch.setattr(Job, "collect", recording)
    steps = [Probe(name, log, [], last=name == "B") for name in "AB"]
    executor = PipelinedExecutor(STEPS_SPEC, steps, CharTokenize(), threads=2)
    executor.alone_threads = all_threads_win()
    try:
        assert executor.submit(Request("embed", ["solo"])).result(WAIT_S)[0][0].output == "solo:2"
        executor.alone_threads = all_threads_win(False)  # down the pipeline: the results stage collects
        assert executor.submit(Request("embed", ["piped"])).result(WAIT_S)[0][0].output == "piped:2"
    finally:
        executor.close()
    assert collected_in == ["ectrans-steps-A", "ectrans-steps-results"]
