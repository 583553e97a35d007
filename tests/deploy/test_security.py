"""CURVE on the farm's links: allowed peers get events, every refused peer is counted (by
ZAP or inside libzmq), and a whole farm runs encrypted."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import zmq
from click.testing import CliRunner
from prometheus_client import REGISTRY

from deploy.cli import main
from deploy.run import run_farm
from deploy.security import KeyGuard, generate_keys, load_pair, node_keys, start_authenticator
from deploy.topology import load_topology
from stream import EventBatch, Node, NodeConfig
from stream.testing import ListSource, synthetic_batch
from stream.transport import (
    CurveKeys,
    Endpoint,
    SocketOptions,
    free_tcp_port,
    open_socket,
    recv_message,
    send_message,
)
from tests.deploy.conftest import synthetic_table, write_topology


def test_only_the_allowed_key_is_admitted(tmp_path: Path) -> None:
    generate_keys(tmp_path, ["up", "down", "intruder"])
    url = f"tcp://127.0.0.1:{free_tcp_port()}"
    ctx = zmq.Context()
    guard = KeyGuard("up", [load_pair(tmp_path, "down")[0]])
    auth = start_authenticator(ctx, guard)
    try:
        up = SocketOptions(curve=node_keys(tmp_path, "up", None), linger_ms=0)
        push = open_socket(ctx, zmq.PUSH, [Endpoint(url, bind=True)], up)
        intruder_pair = load_pair(tmp_path, "intruder")
        server_key = load_pair(tmp_path, "up")[0]
        rogue = open_socket(
            ctx,
            zmq.PULL,
            [Endpoint(url, bind=False)],
            SocketOptions(curve=CurveKeys(*intruder_pair, server_key), linger_ms=0),
        )
        deadline = time.monotonic() + 10
        while guard.refused == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert guard.refused >= 1
        good = open_socket(
            ctx,
            zmq.PULL,
            [Endpoint(url, bind=False)],
            SocketOptions(curve=node_keys(tmp_path, "down", "up"), linger_ms=0),
        )
        for i in range(4):
            assert send_message(push, synthetic_batch(10, first_event=10 * i), timeout_ms=5000)
        got = [recv_message(good, timeout_ms=5000) for _ in range(4)]
        assert all(isinstance(m, EventBatch) and len(m) == 10 for m in got)
        assert recv_message(rogue, timeout_ms=200) is None
        for sock in (push, rogue, good):
            sock.close(linger=0)
    finally:
        auth.stop()
        ctx.term()


def test_every_refused_reader_is_counted_once(tmp_path: Path) -> None:
    generate_keys(tmp_path, ["up", "down", "intruder"])
    url = f"tcp://127.0.0.1:{free_tcp_port()}"
    ctx = zmq.Context()
    down_public = load_pair(tmp_path, "down")[0]
    guard = KeyGuard("curve-up", [down_public])
    auth = start_authenticator(ctx, guard)  # before the node's output binds, as the launcher
    config = NodeConfig(
        "curve-up",
        "source",
        outputs={"out": f"@{url}"},
        heartbeat_interval_s=0.05,
        socket=SocketOptions(curve=node_keys(tmp_path, "up", None), linger_ms=1000),
    )
    batches = [synthetic_batch(5, first_event=5 * i) for i in range(3)]
    node = Node(config, ListSource(batches), context=ctx)
    thread = threading.Thread(target=node.run, daemon=True)
    server = load_pair(tmp_path, "up")[0]
    intruder_public, intruder_secret = load_pair(tmp_path, "intruder")
    connect = [Endpoint(url, bind=False)]

    def reader(curve: CurveKeys | None) -> zmq.Socket:
        sock = open_socket(ctx, zmq.PULL, connect, SocketOptions(curve=curve, linger_ms=0))
        opened.append(sock)
        return sock

    opened: list[zmq.Socket] = []
    try:
        thread.start()
        assert node.wait_started(10)
        rogues = [
            # no CURVE at all: refused inside libzmq (mechanism mismatch), ZAP never asked
            reader(None),
            # the reader stage's public key without its secret: refused inside libzmq
            reader(CurveKeys(down_public, intruder_secret, server)),
            # a valid key pair of the wrong stage: refused by ZAP
            reader(CurveKeys(intruder_public, intruder_secret, server)),
        ]
        deadline = time.monotonic() + 10
        while len(node.stats.curve_refused) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        for rogue in rogues:
            assert recv_message(rogue, timeout_ms=0) is None
            rogue.close(linger=0)
        good = reader(node_keys(tmp_path, "down", "up"))
        got = [recv_message(good, timeout_ms=5000) for _ in batches]
        thread.join(10)
        assert not thread.is_alive()
    finally:
        for sock in opened:
            sock.close(linger=0)
        node.request_stop()
        thread.join(10)
        auth.stop()
        ctx.destroy(linger=0)
    assert [len(m) for m in got if isinstance(m, EventBatch)] == [5, 5, 5]
    refused = node.stats.curve_refused
    assert set(refused) == {"mechanism", "crypto", "key"}, refused
    # ZAP refusals are counted once: by the node's monitor, not again by the guard.
    assert refused["key"] == guard.refused >= 1
    metric = REGISTRY.get_sample_value("curve_refused_total", {"node": "curve-up"})
    assert metric == sum(refused.values())
    assert node.snapshot()["curve_refused"] == dict(refused)
    assert node.stats.balanced and node.stats.accepted == 15


def test_keys_command_writes_a_pair_per_stage(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["keys", "--topology", "default", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for stage in ("source", "l1", "hlt", "archive"):
        public, secret = load_pair(tmp_path, stage)
        assert len(public) == len(secret) == 40
        assert (tmp_path / f"{stage}.key_secret").stat().st_mode & 0o077 == 0
    again = CliRunner().invoke(main, ["keys", "--topology", "default", "--out", str(tmp_path)])
    assert again.exit_code == 2 and "exists" in again.output


@pytest.mark.slow
def test_a_farm_runs_with_curve_on(tmp_path: Path) -> None:
    table = synthetic_table(events=1500)
    table["security"] = {"curve": True, "keys_dir": "keys"}
    path = write_topology(tmp_path / "t.toml", table)
    topology = load_topology(path)
    generate_keys(topology.keys_dir(), [s.name for s in topology.stages])
    report = run_farm(topology, out_dir=tmp_path / "run").report
    assert report["accounting"]["balanced"]
    assert report["stages"][-1]["events_in"] == 1500
    assert all(s["curve_refused"] == 0 for s in report["stages"])


def test_missing_keys_are_a_topology_error(tmp_path: Path) -> None:
    table = synthetic_table()
    table["security"] = {"curve": True, "keys_dir": str(tmp_path / "none")}
    path = write_topology(tmp_path / "t.toml", table)
    result = CliRunner().invoke(
        main, ["run", "--topology", str(path), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code != 0
    assert "topology.security.keys_dir" in str(result.exception) or "keys_dir" in result.output
