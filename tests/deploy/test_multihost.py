"""Two "hosts" as network namespaces joined by a veth pair: source and L1 on one, HLT and
archive on the other, every node started alone with ``trigfarm node`` over TCP with CURVE.
Events flow and balance, and a peer with an unknown key is refused and counted.

The chain's roles are the synthetic ones (this checks the links, the keys and the
staged stop across hosts; the physics chain runs in test_farm_default.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy.roles import ROLES
from deploy.security import generate_keys
from deploy.topology import load_topology
from tests.deploy.conftest import default_table, write_topology

REPO = Path(__file__).resolve().parents[2]
HOST_A, HOST_B = "10.231.7.1", "10.231.7.2"


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


@pytest.fixture
def two_hosts() -> Iterator[tuple[str, str]]:
    """Namespaces A and B with HOST_A and HOST_B on a veth pair; skips where not allowed."""
    tag = str(os.getpid())[-5:]
    ns_a, ns_b = f"tfa{tag}", f"tfb{tag}"
    made = _ip("netns", "add", ns_a)
    if made.returncode != 0:
        pytest.skip(f"network namespaces are not allowed here ({made.stderr.strip()})")
    try:
        steps = [
            ("netns", "add", ns_b),
            ("link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}"),
            ("link", "set", f"va{tag}", "netns", ns_a),
            ("link", "set", f"vb{tag}", "netns", ns_b),
            ("-n", ns_a, "addr", "add", f"{HOST_A}/24", "dev", f"va{tag}"),
            ("-n", ns_b, "addr", "add", f"{HOST_B}/24", "dev", f"vb{tag}"),
            ("-n", ns_a, "link", "set", f"va{tag}", "up"),
            ("-n", ns_b, "link", "set", f"vb{tag}", "up"),
            ("-n", ns_a, "link", "set", "lo", "up"),
            ("-n", ns_b, "link", "set", "lo", "up"),
        ]
        for step in steps:
            done = _ip(*step)
            if done.returncode != 0:
                pytest.skip(
                    f"cannot set up the namespaces: ip {' '.join(step)}: {done.stderr.strip()}"
                )
        yield ns_a, ns_b
    finally:
        _ip("netns", "del", ns_a)
        _ip("netns", "del", ns_b)


ROGUE = """
import sys, zmq, zmq.auth
from stream.transport import CurveKeys, Endpoint, SocketOptions, open_socket, recv_message
public, secret = zmq.curve_keypair()
server = zmq.auth.load_certificate(sys.argv[2])[0]
ctx = zmq.Context()
sock = open_socket(ctx, zmq.PULL, [Endpoint(sys.argv[1], bind=False)],
                   SocketOptions(curve=CurveKeys(public, secret, server), linger_ms=0))
print("connected", flush=True)
got = 0
while True:
    message = recv_message(sock, timeout_ms=1000)
    if message is not None:
        got += len(message)
        print("got", got, flush=True)
"""


@dataclass
class NodeProcess:
    """A ``trigfarm node`` process in a namespace, logging to a file."""

    proc: subprocess.Popen[bytes]
    log: Path

    def running(self) -> bool:
        """Whether it logged that it runs (or died trying)."""
        return self.proc.poll() is not None or ": running" in self.log.read_text()

    def output(self) -> str:
        return self.log.read_text()


def _node(ns: str, stage: str, topo: Path, out: Path, *extra: str) -> NodeProcess:
    log = out.parent / f"{stage}{''.join(extra[-1:])}.log"
    command = [sys.executable, "-m", "deploy", "-v", "node", stage]
    command += ["--config", str(topo), "--out", str(out), *extra]
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *command],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    return NodeProcess(proc, log)


def _stop(nodes: list[NodeProcess]) -> list[str]:
    for node in nodes:
        node.proc.terminate()  # ip netns exec execs the node, which drains on SIGTERM
    for node in nodes:
        node.proc.wait(timeout=60)
    return [node.output() for node in nodes]


def _synthetic_table() -> dict:
    return {
        "farm": {"name": "two-hosts", "chain": ["source", "l1", "hlt", "archive"]},
        "source": {"role": "synthetic-source", "config": {"events": 3000, "batch_size": 100}},
        "l1": {"role": "relay"},
        "hlt": {"role": "relay", "count": 2},
        "archive": {"role": "sink"},
    }


def _physics_table() -> dict:
    table = default_table()
    table["farm"]["name"] = "two-hosts"
    table["source"]["config"]["max_events"] = 256
    return table


@pytest.mark.slow
@pytest.mark.parametrize("chain", ["synthetic", "physics"])
def test_two_hosts_with_curve(tmp_path: Path, two_hosts: tuple[str, str], chain: str) -> None:
    if chain == "physics" and not all(ROLES[r].available() for r in ("l1", "hlt", "archive")):
        pytest.skip("the L1, HLT and archive node modules are not all installed")
    ns_a, ns_b = two_hosts
    table = _synthetic_table() if chain == "synthetic" else _physics_table()
    table["farm"]["drain_idle_s"] = 1.0
    table["security"] = {"curve": True, "keys_dir": "keys"}
    table["metrics"] = {"enabled": False}
    for stage, host, port in (
        ("source", HOST_A, 17101),
        ("l1", HOST_A, 17111),
        ("hlt", HOST_B, 17121),
        ("archive", HOST_B, 17141),  # its receipts of the records it stores
    ):
        table[stage]["hosts"] = host
        table[stage]["port"] = port
    if chain == "physics":  # nodes started one per host need the averaging rendezvous named
        table["hlt"]["learner"]["average_address"] = f"tcp://{HOST_B}:17131"
    topo = write_topology(tmp_path / "topology.toml", table)
    topology = load_topology(topo)
    n_events = 3000 if chain == "synthetic" else 256
    generate_keys(topology.keys_dir(), topology.farm.chain)
    out_a, out_b = tmp_path / "host-a", tmp_path / "host-b"
    rogue = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            ns_b,
            sys.executable,
            "-c",
            ROGUE,
            f"tcp://{HOST_A}:17111",
            str(topology.keys_dir() / "l1.key"),
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    archive = _node(ns_b, "archive", topo, out_b)
    hlts = [_node(ns_b, "hlt", topo, out_b, "--index", str(i)) for i in range(2)]
    l1 = _node(ns_a, "l1", topo, out_a)
    try:
        # Wait for the consumers: the L1 reports running once both HLT nodes connected.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not l1.running():
            time.sleep(0.2)
        source = _node(ns_a, "source", topo, out_a)
        assert source.proc.wait(timeout=120) == 0, source.output()
        outputs = _stop([l1]) + _stop(hlts) + _stop([archive])
    finally:
        for node in (archive, l1, *hlts):
            if node.proc.poll() is None:
                node.proc.kill()
        rogue.kill()
        rogue_out = rogue.communicate(timeout=30)[0]
    stats = {
        name: json.loads(path.read_text())
        for folder in (out_a, out_b)
        for path in (folder / "nodes").glob("*.json")
        for name in [path.stem]
    }
    assert set(stats) == {"source", "l1", "hlt-0", "hlt-1", "archive"}, outputs
    for name, body in stats.items():
        assert body["balanced"], (name, body)
    assert stats["source"]["accepted"] == n_events
    assert stats["l1"]["events_in"] == n_events
    hlt_in = stats["hlt-0"]["events_in"] + stats["hlt-1"]["events_in"]
    assert hlt_in == stats["l1"]["events_out"].get("out", 0) == stats["l1"]["accepted"]
    assert stats["hlt-0"]["events_in"] > 0 and stats["hlt-1"]["events_in"] > 0
    out_port = ROLES[topology.stage("hlt").role].output_port
    hlt_out = sum(stats[n]["events_out"].get(out_port, 0) for n in ("hlt-0", "hlt-1"))
    assert stats["archive"]["events_in"] == hlt_out
    records = sum(stats[n]["records_out"].get(out_port, 0) for n in ("hlt-0", "hlt-1"))
    assert stats["archive"]["records_in"] == records
    if chain == "physics":
        assert records >= 4  # both flows of both HLT nodes crossed the encrypted link
        # ...and the archive's receipts came back over its own CURVE socket
        assert all(stats[n]["records_unconfirmed"] == 0 for n in ("hlt-0", "hlt-1"))
    assert stats["l1"]["extra"]["curve_refused"] >= 1
    assert "got" not in rogue_out, rogue_out
