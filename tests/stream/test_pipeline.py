"""A real multi-process pipeline over TCP on loopback: source -> 2 workers -> sink."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections.abc import Mapping
from multiprocessing.context import SpawnProcess
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TypedDict

import numpy as np
import pytest
import zmq

from stream import NodeConfig
from stream.protocol import HEARTBEAT_TOPIC, Heartbeat
from stream.testing import FakeNodeSpec, run_fake_node, stats_of
from stream.transport import free_tcp_port

SPAWN = mp.get_context("spawn")


class Common(TypedDict):
    """The ``NodeConfig`` settings every node of the pipeline shares."""

    drain_idle_s: float
    heartbeat_interval_s: float
    control: str | None


def start_pipeline(
    tmp_path: Path, source_params: dict, *, control: str | None = None
) -> dict[str, SpawnProcess]:
    src_port, sink_port = free_tcp_port(), free_tcp_port()
    common: Common = {"drain_idle_s": 1.0, "heartbeat_interval_s": 0.2, "control": control}
    specs = {
        "source": FakeNodeSpec(
            NodeConfig(
                "source",
                "source",
                outputs={"out": f"@tcp://127.0.0.1:{src_port}"},
                output_peers=2,  # both workers connected before the first batch
                stats_path=str(tmp_path / "source.json"),
                **common,
            ),
            "source",
            tuple(source_params.items()),
        ),
        "sink": FakeNodeSpec(
            NodeConfig(
                "sink",
                "sink",
                inputs=(f"@tcp://127.0.0.1:{sink_port}",),
                stats_path=str(tmp_path / "sink.json"),
                **common,
            ),
            "sink",
            (("ids_path", str(tmp_path / "ids.npy")),),
        ),
    }
    for i in range(2):
        specs[f"worker{i}"] = FakeNodeSpec(
            NodeConfig(
                f"worker{i}",
                "relay",
                inputs=(f">tcp://127.0.0.1:{src_port}",),
                outputs={"out": f">tcp://127.0.0.1:{sink_port}"},
                stats_path=str(tmp_path / f"worker{i}.json"),
                **common,
            ),
            "relay",
        )
    procs = {
        name: SPAWN.Process(target=run_fake_node, args=(spec,), name=name)
        for name, spec in specs.items()
    }
    for name in ("sink", "worker0", "worker1", "source"):
        procs[name].start()
    return procs


def wait_until_streaming(control: zmq.Socket, names: list[str], timeout_s: float = 60) -> None:
    """Heartbeats say every node runs and the source has sent events (no fixed sleep)."""
    running: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not control.poll(200):
            continue
        beat = Heartbeat.from_frames(control.recv_multipart())
        if beat.state == "running":
            running.add(beat.name)
        sent = beat.stats.get("events_out", {}).get("out", 0) if beat.name == "source" else 0
        if running >= set(names) and sent > 0:
            return
    raise AssertionError(f"only {sorted(running)} of {names} ran within {timeout_s} s")


def stop(procs: Mapping[str, BaseProcess], names: list[str], timeout_s: float = 30) -> None:
    for name in names:
        pid = procs[name].pid
        assert pid is not None, f"{name} was never started"
        os.kill(pid, signal.SIGTERM)
    for name in names:
        procs[name].join(timeout_s)
        assert procs[name].exitcode == 0, f"{name} exited with {procs[name].exitcode}"


def check_books(tmp_path: Path) -> tuple[dict, np.ndarray]:
    stats = {n: stats_of(tmp_path / f"{n}.json") for n in ("source", "worker0", "worker1", "sink")}
    for name, node in stats.items():
        assert node["balanced"], f"{name} does not balance: {node}"
    sent = stats["source"]["events_out"]["out"]
    workers_in = stats["worker0"]["events_in"] + stats["worker1"]["events_in"]
    assert workers_in == sent
    assert stats["sink"]["events_in"] == sent
    ids = np.load(tmp_path / "ids.npy")
    assert len(ids) == sent
    assert len(np.unique(ids[:, 1])) == sent, "an event arrived twice"
    return stats, ids


@pytest.mark.slow
def test_every_event_arrives_exactly_once(tmp_path: Path) -> None:
    procs = start_pipeline(tmp_path, {"n_batches": 40, "batch_size": 256})
    procs["source"].join(60)
    assert procs["source"].exitcode == 0
    stop(procs, ["worker0", "worker1", "sink"])
    stats, ids = check_books(tmp_path)
    assert stats["source"]["events_out"]["out"] == 40 * 256
    np.testing.assert_array_equal(np.sort(ids[:, 1]), np.arange(40 * 256))
    # Both workers took part in the fan-out.
    assert stats["worker0"]["events_in"] > 0 and stats["worker1"]["events_in"] > 0


@pytest.mark.slow
def test_a_graceful_stop_mid_stream_loses_nothing(tmp_path: Path) -> None:
    ctx: zmq.SyncContext = zmq.Context.instance()
    with ctx.socket(zmq.SUB) as control:
        control.setsockopt(zmq.SUBSCRIBE, HEARTBEAT_TOPIC)
        port = control.bind_to_random_port("tcp://127.0.0.1")
        procs = start_pipeline(
            tmp_path,
            {"n_batches": 100_000, "batch_size": 64, "rate_hz": 200.0},
            control=f"tcp://127.0.0.1:{port}",
        )
        wait_until_streaming(control, list(procs))
    assert procs["source"].is_alive(), "source should still be running"
    stop(procs, list(procs))  # SIGTERM to every node at once
    stats, _ = check_books(tmp_path)
    sent = stats["source"]["events_out"]["out"]
    assert 0 < sent < 100_000 * 64
    assert stats["source"]["dropped"] == {}
