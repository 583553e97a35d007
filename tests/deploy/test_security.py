"""CURVE on the farm's links: allowed peers get events, a peer with another key is refused
and counted, and a whole farm runs encrypted."""

from __future__ import annotations

import time
from pathlib import Path

import zmq
from click.testing import CliRunner

from deploy.cli import main
from deploy.run import run_farm
from deploy.security import KeyGuard, generate_keys, load_pair, node_keys, start_authenticator
from deploy.topology import load_topology
from stream.testing import free_tcp_port, synthetic_batch
from stream.transport import (
    CurveKeys,
    Endpoint,
    SocketOptions,
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
        assert all(m is not None and len(m) == 10 for m in got)
        assert recv_message(rogue, timeout_ms=200) is None
        for sock in (push, rogue, good):
            sock.close(linger=0)
    finally:
        auth.stop()
        ctx.term()


def test_keys_command_writes_a_pair_per_stage(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["keys", "--topology", "default", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for stage in ("source", "l1", "hlt", "archive"):
        public, secret = load_pair(tmp_path, stage)
        assert len(public) == len(secret) == 40
        assert (tmp_path / f"{stage}.key_secret").stat().st_mode & 0o077 == 0
    again = CliRunner().invoke(main, ["keys", "--topology", "default", "--out", str(tmp_path)])
    assert again.exit_code == 2 and "exists" in again.output


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
