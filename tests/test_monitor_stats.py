"""The monitor's pure logic: reading metrics entries, windows, instance states, the report's shape."""

from __future__ import annotations

import json
from collections import Counter

from ectrans.common.keys import Keys
from ectrans.services.monitor import alerts
from ectrans.services.monitor.collect import Beat, DeviceState, StreamState
from ectrans.services.monitor.instances import GONE, LIVE, STALE, STOPPED, Tracker
from ectrans.services.monitor.prometheus import stream_labels
from ectrans.services.monitor.quiet import LineGate
from ectrans.services.monitor.report import Snapshot, build_report, flatten, report_line, unflatten
from ectrans.services.monitor.settings import MonitorSettings
from ectrans.services.monitor.stats import Stopped, TaskEntry, Totals, Window, parse_dead_letter, parse_metrics

KNOWN = {"minilm"}
BATCH = {
    "kind": "batch", "model": "minilm", "class": "batch", "worker": "w-0", "size": "4", "tokens": "30",
    "padded_tokens": "40", "service_ms": "12.50", "latency_ms": "20,25,30,100", "queue_ms": "5,6,7,80",
    "reasons": "bad_input:1", "late": "1",
}  # fmt: skip


def test_batch_entry_as_the_worker_writes_it() -> None:
    entry = parse_metrics(BATCH, KNOWN)
    assert isinstance(entry, TaskEntry)
    assert (entry.model, entry.task_class, entry.tasks, entry.ok) == ("minilm", "batch", 4, 3)
    assert entry.deadline_misses == 1 and entry.batch_size == 4
    window = Window()
    window.add(entry)
    window.add(TaskEntry("minilm", "batch", tasks=2, errors=Counter(deadline=2)))
    w = window.classes[("minilm", "batch")]
    assert w.tasks == 6 and w.errors == {"bad_input": 1, "deadline": 2}
    assert w.deadline_misses == 3
    assert w.padding_waste == 0.25
    assert w.service_ms == [12.5] * 4
    assert w.mean_batch == 4


def test_labels_stay_bounded() -> None:
    rejected = parse_metrics({"kind": "errors", "model": "", "class": "", "reasons": "unknown_model:2"}, KNOWN)
    assert isinstance(rejected, TaskEntry) and (rejected.model, rejected.task_class, rejected.tasks) == (
        "none",
        "none",
        2,
    )
    stranger = parse_metrics({"kind": "errors", "model": "x" * 60, "class": "batch", "reasons": "deadline:1"}, KNOWN)
    assert isinstance(stranger, TaskEntry) and stranger.model == "other"
    dead = parse_dead_letter({"fields": json.dumps({"model": "minilm", "class": "realtime"})}, KNOWN)
    assert (dead.model, dead.task_class, dead.errors) == ("minilm", "realtime", {"dead_letter": 1})
    assert parse_dead_letter({"fields": "not json"}, KNOWN).model == "none"


def test_unreadable_entries_are_skipped() -> None:
    assert parse_metrics({"kind": "batch", "size": "four"}, KNOWN) is None
    assert parse_metrics({"kind": "unheard-of"}, KNOWN) is None
    stop = parse_metrics({"kind": "stopped", "service": "worker", "instance": "w-0", "pid": "7"}, KNOWN)
    assert stop == Stopped("worker", "w-0", 7)


def beat(instance: str, pid: int, updated: float, started: float = 0.0) -> Beat:
    return Beat("worker", instance, "h", pid, started, updated, interval_s=1.0, memory={"uss": 10}, fields={})


def test_tracker_states() -> None:
    tracker = Tracker(default_interval_s=2.0, stale_beats=2.0, forget_after_s=100.0)
    assert tracker.update([beat("a", 1, updated=100.0)], now=100.5) == []
    assert tracker.known[("worker", "a")].state == LIVE
    changes = tracker.update([beat("a", 1, updated=100.0)], now=102.5)  # two beats of 1 s missed
    assert tracker.known[("worker", "a")].state == STALE and [c.what for c in changes] == [STALE]
    changes = tracker.update([], now=104.0)  # the key expired, no clean stop heard of
    assert tracker.known[("worker", "a")].state == GONE and [c.what for c in changes] == [GONE]
    changes = tracker.update([beat("a", 2, updated=110.0, started=109.0)], now=110.2)
    inst = tracker.known[("worker", "a")]
    assert (inst.state, inst.restarts, inst.pid) == (LIVE, 1, 2) and [c.what for c in changes] == ["restarted"]
    tracker.stopped(Stopped("worker", "a", 2))
    assert tracker.update([], now=112.0) == []  # a clean stop is no news
    assert tracker.known[("worker", "a")].state == STOPPED
    tracker.update([], now=213.0)
    assert ("worker", "a") not in tracker.known  # forgotten after `forget_after_s`


def test_stop_of_an_earlier_process_does_not_hide_a_death() -> None:
    tracker = Tracker(2.0, 2.0, 100.0)
    tracker.update([beat("a", 1, updated=100.0)], now=100.0)
    tracker.stopped(Stopped("worker", "a", 1))
    tracker.update([beat("a", 2, updated=101.0, started=101.0)], now=101.0)  # restarted before the key went
    tracker.update([], now=110.0)
    assert tracker.known[("worker", "a")].state == GONE


def snapshot(**changes: object) -> Snapshot:
    tracker = Tracker(2.0, 2.0, 100.0)
    tracker.update([beat("w.example.org-0", 5, updated=1000.0)], now=1000.0)
    totals, window = Totals(), Window()
    entry = parse_metrics(BATCH, KNOWN)
    assert isinstance(entry, TaskEntry)
    totals.add(entry)
    window.add(entry)
    snap = Snapshot(
        at=1000.0,
        elapsed_s=2.0,
        monitor="m-0",
        window=window,
        totals=totals,
        streams={
            "ectrans:q:{minilm}:rt": StreamState(length=150, pending=2, lag=148, consumers=1, oldest_pending_s=3.0)
        },
        dead_letters=0,
        instances=tracker.instances(),
        devices=[DeviceState("cpu", "host", 95, 100, 50.0), DeviceState("cuda:0", "H100", 10, 100, 30.0)],
    )
    for name, value in changes.items():
        setattr(snap, name, value)
    return snap


def test_report_flattens_and_back() -> None:
    report = build_report(snapshot(warnings=["one", "two"]), host="h")
    fields = flatten(report)
    assert fields["classes.minilm/batch.tasks_total"] == "4"
    assert fields["classes.minilm/batch.latency_p50_ms"] == "27.5"
    assert fields["instances.worker/w.example.org-0.state"] == "live"
    assert fields["streams.ectrans:q:{minilm}:rt.lag"] == "148"
    assert "devices.cpu.weights_bytes" not in fields  # no weight holder: nothing claimed
    back = unflatten(fields)
    assert back["instances"]["worker/w.example.org-0"]["pid"] == "5"
    assert back["streams"]["ectrans:q:{minilm}:rt"]["pending"] == "2"
    assert back["warnings"] == ["one", "two"]
    assert back["tasks_total"] == "4"


def test_report_line() -> None:
    line = report_line(snapshot())
    assert line.startswith("batch 2.0/s p50 28ms p99 98ms (queue 6ms) 15tok/s size 4.0 pad 25% missed 1 | ")
    assert "errors 1 (bad_input 1)" in line
    assert "workers 1/1" in line and "cpu 0.0/0.0GiB 50%" in line


def test_warnings() -> None:
    settings = MonitorSettings(prefix="ectrans:", queue_warn_len=100, memory_warn_fraction=0.9)
    previous = snapshot(streams={"ectrans:q:{minilm}:rt": StreamState(120, 0, 120)})
    found = alerts.warnings(snapshot(), previous, [], settings)
    assert "queue ectrans:q:{minilm}:rt is growing: 120 → 150" in found
    assert "cpu memory at 95% of 0MiB" in found
    assert not any("cuda:0" in w for w in found)
    assert settings.keys == Keys("ectrans:")


def test_a_gone_instance_is_warned_of_once_a_stale_one_each_interval() -> None:
    """A worker that died and is not restarted stays listed as gone for `forget_after_s` (600 s): a
    warning line each interval for that long (120 lines at 5 s) would bury the others."""
    settings = MonitorSettings(prefix="ectrans:")
    tracker = Tracker(default_interval_s=2.0, stale_beats=2.0, forget_after_s=100.0)
    tracker.update([beat("a", 1, updated=100.0)], now=100.0)

    def warned(beats: list[Beat], now: float) -> list[str]:
        changes = tracker.update(beats, now)
        snap = snapshot(at=now, instances=tracker.instances(), devices=[], streams={})
        return [w for w in alerts.warnings(snap, None, changes, settings) if "worker a " in w]

    for now in (102.5, 103.0):  # stale while its key lasts: each interval
        assert [w.split(":")[0] for w in warned([beat("a", 1, updated=100.0)], now)] == ["worker a is stale"]
    assert [w.split(":")[0] for w in warned([], 104.0)] == ["worker a is gone"]  # the key expired
    assert warned([], 106.0) == [] and warned([], 150.0) == []  # gone still, and listed
    assert tracker.known[("worker", "a")].state == GONE


def test_report_line_is_quiet_while_idle() -> None:
    """Every interval while busy; while idle, on change or once per `idle_every_s`."""
    gate = LineGate(idle_every_s=60.0)
    busy_snap = snapshot()
    idle_snap = snapshot(window=Window(), streams={"ectrans:q:{minilm}:rt": StreamState(0, 0, 0, 1, None)})
    assert gate.should_log(busy_snap, now=0.0) and gate.should_log(busy_snap, now=5.0)
    assert gate.should_log(idle_snap, now=10.0)  # busy → idle is a change
    assert not gate.should_log(idle_snap, now=15.0)
    assert not gate.should_log(idle_snap, now=65.0)
    assert gate.should_log(idle_snap, now=70.0)  # a minute since the last line
    assert gate.should_log(snapshot(window=Window(), streams={}, dead_letters=1), now=75.0)  # idle, but it changed
    assert gate.should_log(busy_snap, now=76.0)


def test_queue_gauges_are_labelled_by_model_and_class() -> None:
    assert stream_labels("ectrans:q:{minilm}:rt") == ["minilm", "realtime"]
    assert stream_labels("p:q:{opus-en.zh}:batch") == ["opus-en.zh", "batch"]
    assert stream_labels("ectrans:tasks") == ["", "ingress"]
