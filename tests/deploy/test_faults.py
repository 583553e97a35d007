"""Fault injection on a learning farm (LHCO features → two learning HLT nodes → archive):
a node killed or paused mid-run, the archive killed and restarted, SIGTERM to
``trigfarm run``, and fuzzed frames into a running node.

Every case asserts that the run ends on its own within a bound, that the books balance
with every loss counted by reason, that every surviving HLT node's flows reach the
archive and that the archive passes ``Archive.verify()``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from deploy.launcher import NodeStatus
from deploy.run import run_farm
from deploy.topology import parse_topology
from models.archive import Archive
from models.online import ROLES
from nodes.archive import ArchiveConfig, ArchiveNode
from stream.codec import encode
from stream.node import Node, NodeConfig
from stream.testing import synthetic_batch
from stream.transport import free_tcp_port
from tests.deploy.conftest import write_topology

REPO = Path(__file__).resolve().parents[2]
LHCO = REPO.parent / "shared" / "data" / "lhco-rnd-100k" / "scalars_bkg01.h5"
BATCH = 256

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not LHCO.is_file(), reason="needs ../shared/data (LHCO features)"),
]


def learning_farm(events: int = 9_000, rate_hz: float = 2_500.0) -> dict[str, Any]:
    """Source → 2 learning HLT nodes (averaging their flows) → archive, at small scale,
    with fast heartbeats, expiry and time-based snapshots."""
    return {
        "farm": {
            "name": "faults",
            "chain": ["source", "hlt", "archive"],
            "heartbeat_interval_s": 0.2,
            "stall_after_s": 10.0,
            "drain_idle_s": 0.5,
            "sndhwm": 2,
            "rcvhwm": 2,
        },
        "security": {"curve": False},
        "source": {
            "config": {
                "background": [f"lhco-features:{LHCO}"],
                "batch_size": BATCH,
                "max_events": events,
                "rate_hz": rate_hz,
            }
        },
        "hlt": {
            "count": 2,
            "config": {"prescale_n": 10},
            "learner": {
                "average_every_steps": 10,
                "average_timeout_s": 3.0,
                "snapshot_every_s": 2.0,
            },
        },
        "archive": {"config": {}},
    }


def in_flight_bound(table: dict[str, Any]) -> int:
    """Events one lost node can take with it: its input queue, both high-water marks, the
    batch it was on and one taken in after its last heartbeat, and what the kernel TCP
    buffers of its input link hold (``socket_buffer_kib`` each end, which Linux doubles;
    >= 80 B an event)."""
    farm = table["farm"]
    batches = farm["sndhwm"] + farm["rcvhwm"] + 4 + 2
    return batches * BATCH + 4 * 256 * 1024 // 80


def fault_when(
    target: str, sig: signal.Signals, *, after_events: int, log: list[float]
) -> Callable[[Mapping[str, NodeStatus]], None]:
    """An ``on_update`` that sends ``sig`` to ``target`` once hlt-0 has seen
    ``after_events`` events."""

    def on_update(current: Mapping[str, NodeStatus]) -> None:
        node, hlt = current.get(target), current.get("hlt-0")
        if log or node is None or hlt is None or hlt.heartbeat is None:
            return
        if hlt.heartbeat.stats.get("events_in", 0) >= after_events and node.process.is_alive():
            assert node.process.pid is not None, "a live process has a pid"
            os.kill(node.process.pid, sig)
            log.append(time.monotonic())

    return on_update


def assert_books_and_flows(report: dict[str, Any], out: Path, survivors: list[str]) -> None:
    assert report["accounting"]["balanced"], report["accounting"]
    source, hlt, archive = report["stages"]
    assert hlt["events_in"] == source["accepted"]
    assert archive["events_in"] == hlt["accepted"]
    store = Archive(out / "archive")
    assert store.verify() == []
    latest = {(s.node_id, s.role) for s in store.snapshots(latest_per_node=True)}
    for node in survivors:
        assert {(node, role) for role in ROLES} <= latest, latest


def test_kill_9_of_one_hlt_node_costs_only_its_in_flight_events(tmp_path: Path) -> None:
    table = learning_farm()
    faulted: list[float] = []
    on_update = fault_when("hlt-1", signal.SIGKILL, after_events=1_500, log=faulted)
    outcome = run_farm(parse_topology(table), out_dir=tmp_path, on_update=on_update)
    report = outcome.report
    assert faulted and time.monotonic() - faulted[0] < 90
    assert report["exitcodes"] == {"source": 0, "hlt-0": 0, "hlt-1": -9, "archive": 0}
    source, hlt, _ = report["stages"]
    assert source["accepted"] == 9_000  # the run went on to its end
    assert report["degraded_stages"] == ["hlt"]
    (loss,) = report["lost_nodes"]["hlt-1"]
    assert loss["reason"] == "exited with code -9" and not loss["restarted"]
    assert 0 <= hlt["dropped"].get("node_lost", 0) <= in_flight_bound(table)
    assert_books_and_flows(report, tmp_path, survivors=["hlt-0"])


def test_a_killed_hlt_node_restarted_rejoins_the_averaging_group(tmp_path: Path) -> None:
    """With ``restart_every_node`` the launcher restarts hlt-1 beside the survivor; the
    new process takes the group's preprocessing, is admitted, and both nodes end with one
    flow, which the archive stores once. The stream lasts long enough (~20 s) for the new
    process to start, calibrate and learn."""
    table = learning_farm(events=40_000, rate_hz=2_000.0)
    table["source"]["config"]["loop"] = True  # the file holds fewer events
    faulted: list[float] = []
    on_update = fault_when("hlt-1", signal.SIGKILL, after_events=3_000, log=faulted)
    outcome = run_farm(
        parse_topology(table), out_dir=tmp_path, on_update=on_update, restart_every_node=True
    )
    report = outcome.report
    assert faulted and time.monotonic() - faulted[0] < 120
    assert all(code == 0 for code in report["exitcodes"].values()), report["exitcodes"]
    (loss,) = report["lost_nodes"]["hlt-1"]
    assert loss["restarted"] and loss["reason"] == "exited with code -9"
    assert report["stages"][0]["accepted"] == 40_000
    assert 0 <= report["stages"][1]["dropped"].get("node_lost", 0) <= in_flight_bound(table)
    stats = json.loads((tmp_path / "nodes" / "hlt-1.json").read_text())
    learner = stats["worker"]["learner"]
    assert learner["average_live_nodes"] == 2 and learner["average_rounds"] >= 1, learner
    assert_books_and_flows(report, tmp_path, survivors=["hlt-0", "hlt-1"])
    latest = Archive(tmp_path / "archive").snapshots(latest_per_node=True)
    for role in ROLES:
        hashes = {s.parameters_hash for s in latest if s.role == role}
        assert len(hashes) == 1, (role, hashes)


def test_survivors_of_hlt_0_go_on_averaging_through_the_launchers_store(tmp_path: Path) -> None:
    """hlt-0 was the averaging store's host; the launcher now hosts it, so the other two
    nodes re-form their group and keep learning one flow."""
    table = learning_farm()
    table["hlt"]["count"] = 3
    faulted: list[float] = []
    on_update = fault_when("hlt-0", signal.SIGKILL, after_events=1_000, log=faulted)
    outcome = run_farm(parse_topology(table), out_dir=tmp_path, on_update=on_update)
    report = outcome.report
    assert faulted and report["exitcodes"]["hlt-0"] == -9
    assert report["stages"][0]["accepted"] == 9_000
    for name in ("hlt-1", "hlt-2"):
        stats = json.loads((tmp_path / "nodes" / f"{name}.json").read_text())
        learner = stats["worker"]["learner"]
        assert learner["average_live_nodes"] == 2, learner
        assert learner["average_rounds"] >= 2, learner
    assert_books_and_flows(report, tmp_path, survivors=["hlt-1", "hlt-2"])


def test_sigstop_of_one_hlt_node_is_expired_and_the_run_goes_on(tmp_path: Path) -> None:
    table = learning_farm()
    table["farm"]["stall_after_s"] = 4.0
    faulted: list[float] = []
    on_update = fault_when("hlt-1", signal.SIGSTOP, after_events=1_500, log=faulted)
    outcome = run_farm(parse_topology(table), out_dir=tmp_path, on_update=on_update)
    report = outcome.report
    assert faulted and time.monotonic() - faulted[0] < 90
    (loss,) = report["lost_nodes"]["hlt-1"]
    assert loss["reason"].startswith("no heartbeat for")
    assert report["stages"][0]["accepted"] == 9_000
    assert report["exitcodes"]["hlt-0"] == 0 and report["exitcodes"]["archive"] == 0
    assert 0 <= report["stages"][1]["dropped"].get("node_lost", 0) <= in_flight_bound(table)
    assert_books_and_flows(report, tmp_path, survivors=["hlt-0"])


def test_kill_9_of_the_archive_is_restarted_and_loses_no_flow(tmp_path: Path) -> None:
    """Upstream holds (back-pressure) while the archive is down; the restarted archive
    continues its file sequence; every HLT node's final flows are archived."""
    table = learning_farm()
    faulted: list[float] = []
    on_update = fault_when("archive", signal.SIGKILL, after_events=1_500, log=faulted)
    outcome = run_farm(parse_topology(table), out_dir=tmp_path, on_update=on_update)
    report = outcome.report
    assert faulted and time.monotonic() - faulted[0] < 90
    assert all(code == 0 for code in report["exitcodes"].values()), report["exitcodes"]
    (loss,) = report["lost_nodes"]["archive"]
    assert loss["restarted"] and loss["reason"] == "exited with code -9"
    assert report["stages"][0]["accepted"] == 9_000
    archive = report["stages"][2]
    assert archive["node_lost_estimated"]
    assert 0 <= archive["dropped"].get("node_lost", 0) <= in_flight_bound(table)
    # Every snapshot the HLT nodes sent is confirmed by the archive that stored it: a copy
    # the killed one had received but not written was sent again (stream.receipts).
    hlt = report["stages"][1]
    assert hlt["records_unconfirmed"] == 0 and hlt["records_lost"] == 0
    assert hlt["records_resent"] >= archive.get("records_lost_in_flight", 0)
    assert_books_and_flows(report, tmp_path, survivors=["hlt-0", "hlt-1"])


def test_sigterm_to_trigfarm_run_stops_in_stages_with_a_report(tmp_path: Path) -> None:
    table = learning_farm(events=1_000_000, rate_hz=2_000.0)
    path = write_topology(tmp_path / "t.toml", table)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "deploy", "run", "--topology", str(path), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            stats = out / "nodes"
            farm = out / "farm.json"
            if farm.is_file() and json.loads(farm.read_text())["state"] == "running":
                break
            time.sleep(0.2)
        time.sleep(4.0)  # let the HLT nodes learn and publish a time-based snapshot
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    text = stdout.decode()
    assert proc.returncode == 0, stderr.decode()[-3000:]
    assert "(interrupted)" in text and "accounting" in text
    assert json.loads((out / "farm.json").read_text())["state"] == "stopped"
    report = json.loads((out / "report.json").read_text())
    assert report["interrupted"] and not report["lost_nodes"]
    assert stats.is_dir()
    assert_books_and_flows(report, out, survivors=["hlt-0", "hlt-1"])


def _fuzzed(rng: np.random.Generator, valid: list[bytes]) -> list[bytes]:
    """One malformed message: a valid batch's frames with bytes flipped, cut, dropped,
    duplicated or replaced, or a header with fields of the wrong type or size."""
    frames = [bytearray(f) for f in valid]
    kind = rng.integers(6)
    i = int(rng.integers(len(frames)))
    if kind == 0 and frames[i]:
        for j in rng.integers(0, len(frames[i]), size=int(rng.integers(1, 8))):
            frames[i][j] ^= int(rng.integers(1, 256))
    elif kind == 1:
        frames[i] = frames[i][: int(rng.integers(0, len(frames[i]) + 1))]
    elif kind == 2:
        del frames[i]
    elif kind == 3:
        frames.insert(i, frames[i])
    elif kind == 4:
        frames[i] = bytearray(rng.bytes(int(rng.integers(0, 200))))
    else:
        header = msgpack.unpackb(bytes(frames[0]))
        key = rng.choice(sorted(header))
        header[str(key)] = [True, -1, 2**64 - 1, "x", None, [1], {"a": 1}, 1e300][
            int(rng.integers(8))
        ]
        frames[0] = bytearray(msgpack.packb(header))
    return [bytes(f) for f in frames]


def test_ten_thousand_fuzzed_frames_into_a_running_archive(tmp_path: Path) -> None:
    """A running archive node fed 10^4 malformed messages between valid batches keeps
    running, stores every valid event, balances its books and leaves a clean archive."""
    port = free_tcp_port()
    config = NodeConfig(name="archive", role="archive", inputs=(f"@tcp://127.0.0.1:{port}",))
    worker = ArchiveNode(ArchiveConfig(out_dir=str(tmp_path / "archive")), name="archive")
    node = Node(config, worker)
    thread = threading.Thread(target=node.run, daemon=True)
    thread.start()
    assert node.wait_started(30)
    rng = np.random.default_rng(2026)
    valid = [bytes(f) for f in encode(synthetic_batch(8, first_event=0))]
    ctx: zmq.SyncContext = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    good = 0
    for i in range(10_000):
        push.send_multipart(_fuzzed(rng, valid))
        if i % 1_000 == 0:
            push.send_multipart(encode(synthetic_batch(5, first_event=1_000 + good * 5)))
            good += 1
    push.close(linger=10_000)
    node.request_stop()  # the node drains what it was sent, then stops
    thread.join(60)
    assert not thread.is_alive()
    stats = node.stats
    assert stats.balanced and stats.events_in >= 10_000
    assert stats.dropped.get("decode_error", 0) > 5_000
    stored = Archive(tmp_path / "archive")
    assert stored.verify() == []
    events = {int(e) for batch in stored.events() for e in batch["event"]}
    assert {1_000 + k for k in range(5 * good)} <= events
