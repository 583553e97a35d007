"""ParameterAverager over real gloo on loopback: real processes, real failures, no mocks.

Each node is a spawned process holding a small ``torch.nn.Linear`` and driven over a pipe
by the test, which kills (SIGKILL), stalls (SIGSTOP) or resumes nodes between rounds.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing as mp
import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, TypedDict

import pytest
import torch

from models.averaging import AveragingConfig, AveragingStore, ParameterAverager

TIMEOUT_S = 3.0
# A failed round must come back within about TIMEOUT_S; allow a loaded 2-core machine.
BOUND_S = 20.0
# A round after the group settled must not wait for a timeout again.
FAST_S = 1.5
STARTUP_S = 60.0
TOLERANCE = 1e-6


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _flat(model: torch.nn.Module) -> list[float]:
    return [float(v) for p in model.parameters() for v in p.detach().reshape(-1)]


def _node(
    rank: int,
    world_size: int,
    init_method: str,
    timeout_s: float,
    conn: Connection,
    store_on_rank0: bool = True,
) -> None:
    """One node: obeys ("average", weight, seed | None), ("exit",) and ("close",)."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo on loopback only
    torch.manual_seed(1000 + rank)
    model = torch.nn.Linear(4, 3)
    config = AveragingConfig(
        rank,
        world_size,
        init_method,
        every_steps=1,
        timeout_s=timeout_s,
        store_on_rank0=store_on_rank0,
    )
    averager = ParameterAverager(config, node_id=f"test-{rank}")
    conn.send(("ready", rank))
    while True:
        command = conn.recv()
        if command[0] == "exit":
            os._exit(0)
        if command[0] == "close":
            averager.close()
            averager.close()
            conn.send(("closed", rank))
            conn.close()
            return
        _, weight, seed = command
        if seed is not None:  # new local weights, as after some local training
            torch.manual_seed(seed)
            with torch.no_grad():
                for p in model.parameters():
                    p.uniform_(-1.0, 1.0)
        before = _flat(model)
        began = time.monotonic()
        ok = averager.average_([model], weight)
        elapsed = time.monotonic() - began
        report = {
            "ok": ok,
            "elapsed": elapsed,
            "before": before,
            "after": _flat(model),
            "alone": averager.alone,
            **dataclasses.asdict(averager.stats()),
        }
        conn.send(("averaged", report))


class Farm:
    """Spawned nodes on loopback, driven round by round."""

    def __init__(self, world_size: int, store: AveragingStore | None = None) -> None:
        self.world_size = world_size
        self.init_method = store.init_method if store else f"tcp://127.0.0.1:{_free_port()}"
        self.store_on_rank0 = store is None
        self.conns: dict[int, Connection] = {}
        self.procs: dict[int, BaseProcess] = {}
        self.stopped: set[int] = set()
        for rank in range(world_size):
            self._spawn(rank)
        for rank in range(world_size):
            assert self._recv(rank, STARTUP_S) == ("ready", rank)

    def _spawn(self, rank: int) -> None:
        parent, child = mp.get_context("spawn").Pipe()
        proc = mp.get_context("spawn").Process(
            target=_node,
            args=(rank, self.world_size, self.init_method, TIMEOUT_S, child, self.store_on_rank0),
            daemon=True,
        )
        proc.start()
        child.close()
        self.conns[rank], self.procs[rank] = parent, proc

    def restart(self, rank: int) -> None:
        """A fresh process for a rank that died, as a supervisor would start it."""
        self.procs[rank].close()
        self.conns[rank].close()
        self._spawn(rank)
        assert self._recv(rank, STARTUP_S) == ("ready", rank)

    def begin(self, rank: int, weight: float, seed: int | None = None) -> None:
        """Start a round on one rank without waiting for it (``report`` collects it)."""
        self.conns[rank].send(("average", weight, seed))

    def report(self, rank: int) -> dict[str, Any]:
        kind, report = self._recv(rank, BOUND_S + 10.0)
        assert kind == "averaged"
        result: dict[str, Any] = report
        return result

    def _recv(self, rank: int, timeout_s: float) -> Any:
        if not self.conns[rank].poll(timeout_s):
            pytest.fail(f"node {rank} did not answer within {timeout_s} s")
        return self.conns[rank].recv()

    def average(
        self, weights: dict[int, float], seeds: dict[int, int] | None = None
    ) -> dict[int, dict[str, Any]]:
        """One round on the given ranks (all at once); their reports."""
        for rank, weight in weights.items():
            self.begin(rank, weight, (seeds or {}).get(rank))
        return {rank: self.report(rank) for rank in weights}

    def kill(self, rank: int) -> None:
        proc = self.procs[rank]
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10.0)
        assert not proc.is_alive()

    def exit(self, rank: int) -> None:
        self.conns[rank].send(("exit",))
        self.procs[rank].join(10.0)
        assert not self.procs[rank].is_alive()

    def stop(self, rank: int) -> None:
        pid = self.procs[rank].pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        self.stopped.add(rank)

    def resume(self, rank: int) -> None:
        pid = self.procs[rank].pid
        assert pid is not None
        os.kill(pid, signal.SIGCONT)
        self.stopped.discard(rank)

    def close(self) -> None:
        """Close live nodes (rank 0, the store host, last), then reap everything."""
        try:
            for rank in sorted(self.procs, reverse=True):
                proc = self.procs[rank]
                if proc.is_alive() and rank not in self.stopped:
                    self.conns[rank].send(("close",))
                    if self.conns[rank].poll(10.0):
                        self.conns[rank].recv()
        except (BrokenPipeError, EOFError, ConnectionResetError):
            pass
        finally:
            for rank, proc in self.procs.items():
                if proc.is_alive():
                    if rank in self.stopped and proc.pid is not None:
                        os.kill(proc.pid, signal.SIGCONT)
                    proc.join(5.0)
                if proc.is_alive():
                    proc.kill()
                    proc.join(5.0)
                proc.close()
                self.conns[rank].close()


@contextmanager
def farm(world_size: int, store: AveragingStore | None = None) -> Iterator[Farm]:
    nodes = Farm(world_size, store)
    try:
        yield nodes
    finally:
        nodes.close()


def _weighted_mean(reports: dict[int, dict[str, Any]], weights: dict[int, float]) -> list[float]:
    total = sum(weights.values())
    n = len(next(iter(reports.values()))["before"])
    return [sum(weights[r] * reports[r]["before"][i] for r in weights) / total for i in range(n)]


def _assert_close(actual: list[float], expected: list[float]) -> None:
    assert len(actual) == len(expected)
    worst = max(abs(a - e) for a, e in zip(actual, expected, strict=True))
    assert worst < TOLERANCE, f"largest deviation {worst}"


def _assert_settled_round(nodes: Farm, weights: dict[int, float], seeds: dict[int, int]) -> None:
    """A round on a group that has settled: every node holds the weighted mean, at once."""
    reports = nodes.average(weights, seeds=seeds)
    expected = _weighted_mean(reports, weights)
    for report in reports.values():
        assert report["ok"] is True
        assert report["elapsed"] < FAST_S
        _assert_close(report["after"], expected)


# -- configuration and single-node behaviour (no network) ---------------------------------


class Good(TypedDict):
    """The settings every ``AveragingConfig`` needs."""

    rank: int
    world_size: int
    init_method: str


GOOD: Good = {"rank": 0, "world_size": 2, "init_method": "tcp://127.0.0.1:29511"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rank": 2}, r"rank must lie in \[0, 2\), got 2"),
        ({"rank": -1}, r"rank must lie in \[0, 2\), got -1"),
        ({"world_size": 0, "rank": 0}, r"(?m)^world_size$"),
        ({"every_steps": 0}, r"(?m)^every_steps$"),
        ({"timeout_s": 0.0}, r"(?m)^timeout_s$"),
        ({"timeout_s": -1.0}, r"(?m)^timeout_s$"),
        ({"timeout_s": math.nan}, r"(?m)^timeout_s$"),
        ({"timeout_s": math.inf}, r"(?m)^timeout_s$"),
        ({"init_method": "env://"}, r"(?m)^init_method\n.*must look like tcp://"),
        ({"init_method": "127.0.0.1:29511"}, r"(?m)^init_method\n.*must look like tcp://"),
        ({"init_method": "tcp://127.0.0.1"}, r"(?m)^init_method\n.*must name a host and a port"),
        ({"init_method": "tcp://:29511"}, r"(?m)^init_method\n.*must name a host and a port"),
        ({"init_method": "tcp://127.0.0.1:notaport"}, r"(?m)^init_method\n.*invalid port"),
    ],
)
def test_config_rejects_bad_values(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AveragingConfig(**{**GOOD, **change})


def test_config_accepts_good_values() -> None:
    config = AveragingConfig(**GOOD, every_steps=7, timeout_s=2.5)
    assert (config.host, config.port, config.every_steps) == ("127.0.0.1", 29511, 7)


def test_single_node_world_averages_trivially_without_network() -> None:
    config = AveragingConfig(0, 1, "tcp://127.0.0.1:1", every_steps=3, timeout_s=1.0)
    model = torch.nn.Linear(4, 3)
    before = _flat(model)
    with ParameterAverager(config, node_id="solo") as averager:
        assert [averager.maybe_average_([model], step, 1.0) for step in range(1, 7)] == [
            False,
            False,
            True,
            False,
            False,
            True,
        ]
        assert averager.rounds == 2
        assert averager.live_world_size == 1
        assert _flat(model) == before
        with pytest.raises(ValueError):
            averager.average_([model], -1.0)
        with pytest.raises(ValueError):
            averager.average_([model], math.inf)
        with pytest.raises(ValueError):
            averager.average_([torch.nn.ReLU()], 1.0)
    averager.close()  # twice is fine
    with pytest.raises(RuntimeError):
        averager.average_([model], 1.0)


# -- real processes ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_two_nodes_hold_the_weighted_average() -> None:
    with farm(2) as nodes:
        weights = {0: 3.0, 1: 1.0}
        reports = nodes.average(weights)
        expected = _weighted_mean(reports, weights)
        assert reports[0]["before"] != reports[1]["before"]
        for report in reports.values():
            assert report["ok"] is True
            _assert_close(report["after"], expected)
            assert (report["rounds"], report["failures"], report["live_world_size"]) == (1, 0, 2)

        # Nobody learned anything (weight 0 everywhere): the nodes count equally.
        reports = nodes.average({0: 0.0, 1: 0.0}, seeds={0: 7, 1: 8})
        expected = _weighted_mean(reports, {0: 1.0, 1: 1.0})
        for report in reports.values():
            assert report["ok"] is True
            _assert_close(report["after"], expected)
            assert report["rounds"] == 2


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_survivor_of_two_goes_on_alone_without_blocking() -> None:
    with farm(2) as nodes:
        assert all(r["ok"] for r in nodes.average({0: 1.0, 1: 1.0}).values())
        nodes.kill(1)

        report = nodes.average({0: 5.0}, seeds={0: 11})[0]
        assert report["ok"] is False
        assert report["elapsed"] < BOUND_S
        assert report["after"] == report["before"]  # untouched on failure
        assert report["failures"] >= 1
        assert report["rounds"] == 1
        assert (report["live_world_size"], report["peers_dropped"], report["alone"]) == (
            1,
            1,
            True,
        )
        failures = report["failures"]

        report = nodes.average({0: 5.0}, seeds={0: 12})[0]
        assert report["ok"] is False
        assert report["elapsed"] < FAST_S
        assert report["after"] == report["before"]
        assert report["failures"] == failures


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize("when", ["before the first round", "after a round"])
def test_two_survivors_of_three_reform_and_average(when: str) -> None:
    with farm(3) as nodes:
        if when == "after a round":
            assert all(r["ok"] for r in nodes.average({0: 1.0, 1: 2.0, 2: 3.0}).values())
        nodes.kill(2)

        weights = {0: 2.0, 1: 5.0}
        reports = nodes.average(weights, seeds={0: 21, 1: 22})
        expected = _weighted_mean(reports, weights)
        for report in reports.values():
            assert report["ok"] is True
            assert report["elapsed"] < BOUND_S
            _assert_close(report["after"], expected)
            assert report["failures"] >= 1
            assert (report["live_world_size"], report["peers_dropped"]) == (2, 1)
            assert report["generation"] >= 1

        weights = {0: 1.0, 1: 4.0}
        failures = {rank: r["failures"] for rank, r in reports.items()}
        reports = nodes.average(weights, seeds={0: 23, 1: 24})
        expected = _weighted_mean(reports, weights)
        for rank, report in reports.items():
            assert report["ok"] is True
            assert report["elapsed"] < FAST_S
            _assert_close(report["after"], expected)
            assert report["failures"] == failures[rank]


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_stalled_peer_is_dropped_and_does_not_block_when_it_resumes() -> None:
    with farm(3) as nodes:
        assert all(r["ok"] for r in nodes.average({0: 1.0, 1: 1.0, 2: 1.0}).values())
        nodes.stop(1)

        weights = {0: 1.0, 2: 3.0}
        reports = nodes.average(weights, seeds={0: 31, 2: 32})
        expected = _weighted_mean(reports, weights)
        for report in reports.values():
            assert report["ok"] is True
            assert report["elapsed"] < BOUND_S
            _assert_close(report["after"], expected)
            assert report["live_world_size"] == 2

        # The stalled node resumes: its peers are gone, it learns so at once and goes alone.
        nodes.resume(1)
        report = nodes.average({1: 1.0}, seeds={1: 33})[1]
        assert report["ok"] is False
        assert report["elapsed"] < BOUND_S
        assert report["after"] == report["before"]
        assert report["alone"] is True

        _assert_settled_round(nodes, weights, seeds={0: 34, 2: 35})


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_store_host_death_leaves_each_survivor_alone_quickly() -> None:
    with farm(3) as nodes:
        assert all(r["ok"] for r in nodes.average({0: 1.0, 1: 1.0, 2: 1.0}).values())
        nodes.exit(0)

        reports = nodes.average({1: 1.0, 2: 1.0}, seeds={1: 41, 2: 42})
        for report in reports.values():
            assert report["ok"] is False
            assert report["elapsed"] < BOUND_S
            assert report["after"] == report["before"]
            assert (report["alone"], report["live_world_size"]) == (True, 1)

        reports = nodes.average({1: 1.0, 2: 1.0})
        for report in reports.values():
            assert report["ok"] is False
            assert report["elapsed"] < FAST_S


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_survivors_of_rank0_death_go_on_averaging_with_an_external_store() -> None:
    with AveragingStore("tcp://127.0.0.1:0", timeout_s=TIMEOUT_S) as store, farm(3, store) as nodes:
        assert all(r["ok"] for r in nodes.average({0: 1.0, 1: 1.0, 2: 1.0}).values())
        nodes.kill(0)

        weights = {1: 2.0, 2: 5.0}
        reports = nodes.average(weights, seeds={1: 51, 2: 52})
        expected = _weighted_mean(reports, weights)
        for report in reports.values():
            assert report["ok"] is True
            assert report["elapsed"] < BOUND_S
            _assert_close(report["after"], expected)
            assert (report["live_world_size"], report["peers_dropped"]) == (2, 1)

        _assert_settled_round(nodes, weights, seeds={1: 53, 2: 54})


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize("store_host", ["rank 0", "external"])
def test_a_restarted_node_is_readmitted_and_adopts_the_groups_flow(store_host: str) -> None:
    """The survivor of two is alone; the dead rank's replacement asks to join, the survivor
    admits it at its next round, the newcomer takes the survivor's flow (weight 0 for its
    own), and from then on both average as one group."""
    with ExitStack() as stack:
        store = None
        if store_host == "external":
            store = stack.enter_context(AveragingStore("tcp://127.0.0.1:0", timeout_s=TIMEOUT_S))
        nodes = stack.enter_context(farm(2, store))
        assert all(r["ok"] for r in nodes.average({0: 1.0, 1: 1.0}).values())
        nodes.kill(1)
        assert nodes.average({0: 1.0})[0]["alone"] is True

        nodes.restart(1)
        nodes.begin(1, 5.0, seed=61)  # the newcomer asks and waits inside its first round
        survivor: dict[str, Any] = {}
        for attempt in range(40):
            survivor = nodes.average({0: 2.0}, seeds={0: 62} if attempt == 0 else None)[0]
            if survivor["ok"]:
                break
            time.sleep(0.1)
        newcomer = nodes.report(1)
        assert survivor["ok"] and newcomer["ok"], (survivor, newcomer)
        assert newcomer["before"] != survivor["before"]
        _assert_close(newcomer["after"], survivor["before"])  # adopted, not mixed in
        _assert_close(survivor["after"], survivor["before"])
        for report in (survivor, newcomer):
            assert (report["alone"], report["live_world_size"]) == (False, 2)
            assert report["generation"] >= 2

        weights = {0: 1.0, 1: 3.0}
        _assert_settled_round(nodes, weights, seeds={0: 63, 1: 64})


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_newcomer_nobody_admits_goes_on_alone_within_its_timeout() -> None:
    with farm(2) as nodes:
        assert all(r["ok"] for r in nodes.average({0: 1.0, 1: 1.0}).values())
        nodes.kill(1)
        nodes.restart(1)  # the survivor makes no round meanwhile
        report = nodes.average({1: 1.0}, seeds={1: 71})[1]
        assert report["ok"] is False
        assert report["alone"] is True
        assert TIMEOUT_S * 0.9 < report["elapsed"] < BOUND_S
        assert report["after"] == report["before"]
        assert nodes.average({0: 1.0})[0]["ok"] is False  # the withdrawn request is not seen
