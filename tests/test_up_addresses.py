"""`ectrans up`'s choice of ports and of the heartbeats it waits for, without starting a stack."""

from __future__ import annotations

import socket
import threading

import pytest

from ectrans import cli
from ectrans.client import Client
from ectrans.commands import up
from ectrans.common.heartbeat import host_name
from ectrans.local import stacks


def test_port_0_asks_for_a_free_port_as_the_gateway_does() -> None:
    held: list[socket.socket] = []
    try:
        host, port = up.gateway_address("127.0.0.1:0", held)
        assert host == "127.0.0.1" and port > 0
        assert [sock.getsockname()[1] for sock in held] == [port]
    finally:
        for sock in held:
            sock.close()


def test_a_taken_or_unusable_address_is_a_clear_error_and_holds_nothing() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        spec = f"127.0.0.1:{taken.getsockname()[1]}"
        for address, why in ((spec, "the port is taken"), ("127.0.0.1:70000", "cannot listen on 127.0.0.1:70000")):
            held: list[socket.socket] = []
            with pytest.raises(SystemExit, match=why):
                up.gateway_address(address, held)
            assert held == []


def test_ready_waits_for_the_gateways_own_heartbeat_whatever_ectrans_instance_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The gateway names itself `<host>-<port>` (it ignores ECTRANS_INSTANCE): waiting for a heartbeat
    under ECTRANS_INSTANCE instead meant `ready` was never announced."""
    monkeypatch.setenv("ECTRANS_INSTANCE", "edge-7")
    children = up._children("redis://127.0.0.1:1/0", up.instance_names("default", 1), ("127.0.0.1", 8123))
    beats = up.heartbeat_keys("p:", children)
    assert f"p:hb:gateway:{host_name()}-8123" in beats
    assert sorted(beats) == sorted(
        [f"p:hb:{kind}:edge-7" for kind in ("dispatcher", "worker", "monitor")] + [f"p:hb:gateway:{host_name()}-8123"]
    )


def test_a_sync_client_for_a_stack_not_running_leaves_no_loop_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    def client_threads() -> int:
        return sum(thread.name == "ectrans-client" for thread in threading.enumerate())

    monkeypatch.setenv("ECTRANS_STACK", "not-running-here")
    before = client_threads()
    with pytest.raises(stacks.StackNotFound):
        Client()
    assert client_threads() == before


@pytest.mark.parametrize("keys", ["", " , ", '[""]'])
def test_a_public_gateway_without_a_usable_key_is_refused_before_anything_starts(
    keys: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys as the gateway reads them: blank ones are none, and a gateway that refuses to start would
    be restarted in a loop while `up` waits for its heartbeat."""
    monkeypatch.setenv("ECTRANS_GATEWAY_API_KEYS", keys)
    held: list[socket.socket] = []
    with pytest.raises(SystemExit, match="set ECTRANS_GATEWAY_API_KEYS"):
        up.gateway_address("0.0.0.0:0", held)
    assert held == []


def test_the_banner_names_a_model_and_op_the_stack_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    """`ectrans up --serve noop` shows commands that work on that stack, not minilm's embed."""
    assert up.example_task() == ("minilm", "embed")  # the default stack
    monkeypatch.setenv("ECTRANS_MODELS_JSON", '{"noop": {"kind": "noop"}}')
    monkeypatch.setenv("ECTRANS_SERVE_MODELS", "noop")
    task = up.example_task()
    assert task == ("noop", "noop")
    shown = up._banner("redis://127.0.0.1:7000/0", "ectrans:", stacks.DEFAULT_NAME, task)
    shown += up._http_banner(("127.0.0.1", 8000), None, task)
    assert "model noop op noop input" in shown and "ectrans submit --model noop --op noop 'some text'" in shown
    assert "minilm" not in shown and """-d '{"model": "noop", "input": "some text"}'""" in shown
    monkeypatch.setenv("ECTRANS_SERVE_MODELS", "*")
    assert up.example_task() == ("minilm", "embed")


@pytest.mark.parametrize("count", ["-1", "two", "1.5"])
def test_a_negative_or_non_numeric_worker_count_is_refused(count: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`--workers -1` started a stack with no worker that announced itself ready."""
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["up", "--workers", count])  # parsing only: nothing starts
    assert "--workers: must be a whole number, 0 or more" in capsys.readouterr().err
    assert cli.build_parser().parse_args(["up", "--workers", "0"]).workers == 0
