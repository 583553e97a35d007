"""A node process ends with its own exit code even when a daemon thread is still inside
torch's C++ (an averaging call abandoned on a store that has just closed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stream.transport import free_tcp_port
from tests.deploy.conftest import default_table, write_topology

REPO = Path(__file__).resolve().parents[2]

# A store client blocked on a daemon thread; its server closes as the process ends, so the
# thread wakes while Python finalizes. Ending through plain SystemExit aborts the process
# ("terminate called without an active exception") in most runs.
_SCRIPT = textwrap.dedent(
    """
    import threading, time
    from datetime import timedelta
    import torch.distributed as dist
    from stream.transport import free_tcp_port
    from deploy.launcher import exit_node_process

    port = free_tcp_port("127.0.0.1")
    server = dist.TCPStore("127.0.0.1", port, None, True, timedelta(seconds=30))
    client = dist.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=30))

    def blocked():
        try:
            client.get("never-set")
        except Exception:
            pass

    threading.Thread(target=blocked, daemon=True).start()
    time.sleep(0.5)
    del server
    print("books written", flush=True)
    exit_node_process(7)
    """
)


@pytest.mark.slow  # starts node processes (seconds each)
def test_a_node_process_exits_with_its_code_despite_a_thread_blocked_in_torch() -> None:
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", _SCRIPT],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for run in runs:
        stdout, stderr = run.communicate(timeout=120)
        assert run.returncode == 7, stderr[-2000:]
        assert stdout == "books written\n"
        assert "terminate called" not in stderr


@pytest.mark.slow  # starts node processes (seconds each)
def test_a_node_stopped_while_it_starts_stops_cleanly(tmp_path: Path) -> None:
    """SIGTERM while the node still imports torch and loads its tagger (a restart at the
    farm's staged stop): the node starts, drains nothing and exits 0 with its books."""
    table = default_table()
    table["hlt"]["count"] = 1  # no averaging group to wait for
    table["hlt"]["learner"]["average_address"] = f"tcp://127.0.0.1:{free_tcp_port()}"
    for stage in ("source", "l1", "hlt", "archive"):
        table[stage]["port"] = free_tcp_port()
    table["metrics"] = {"enabled": False}
    topology = write_topology(tmp_path / "t.toml", table)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "deploy", "node", "hlt", "--config", str(topology)]
    node = subprocess.Popen(
        [*command, "--out", str(out)], cwd=REPO, stderr=subprocess.PIPE, text=True
    )
    assert node.stderr is not None
    first = node.stderr.readline()  # printed just before the worker is built
    assert first.startswith("hlt: inputs"), first
    node.send_signal(signal.SIGTERM)  # while it imports torch: no Node, no handler of its own
    _, stderr = node.communicate(timeout=120)
    assert node.returncode == 0, stderr[-3000:]
    stats = json.loads((out / "nodes" / "hlt.json").read_text())
    assert stats["balanced"] and stats["events_in"] == 0


@pytest.mark.slow  # starts node processes (seconds each)
def test_a_spawned_node_stopped_before_it_can_handle_signals_stops_cleanly(
    tmp_path: Path,
) -> None:
    """SIGTERM the instant the launcher has spawned a node, while the new interpreter still
    imports the launcher's module: the stop waits for the node and it exits 0."""
    import multiprocessing as mp

    from deploy.launcher import plan_farm, spawn_node
    from deploy.topology import load_topology

    table = default_table()
    table["metrics"] = {"enabled": False}
    topology = load_topology(write_topology(tmp_path / "t.toml", table))
    out = tmp_path / "out"
    plan = plan_farm(topology, out_dir=out, control=f"tcp://127.0.0.1:{free_tcp_port()}")
    (out / "nodes").mkdir(parents=True)
    process = spawn_node(mp.get_context("spawn"), plan.stage_nodes("archive")[0])
    assert process.pid is not None
    os.kill(process.pid, signal.SIGTERM)
    process.join(timeout=120)
    assert process.exitcode == 0
    stats = json.loads((out / "nodes" / "archive.json").read_text())
    assert stats["balanced"] and stats["events_in"] == 0
