"""One flow across HLT nodes: two learners in two processes average their flows over gloo
on loopback and publish the same flow, learned from both shares of the stream, even when
their shares differ (the node that finishes first keeps joining rounds)."""

from __future__ import annotations

import multiprocessing
from typing import Any

import numpy as np
import pytest

from models.online import ROLES
from stream.transport import free_tcp_port
from tests.conftest import SmallFlow

SMALL: SmallFlow = {
    "n_transforms": 1,
    "hidden_features": 8,
    "n_bins": 4,
    "n_blocks": 1,
    "n_members": 2,
}


def run_node(index: int, count: int, every: int, port: int, out: Any) -> None:
    """One HLT node's learner on its own share of a stream; sends its final snapshots."""
    import torch

    from models.snapshot import FlowSnapshot
    from nodes.learner import FlowLearnerConfig, build_learner
    from stream.batch import EventBatch

    torch.set_num_threads(1)
    config = FlowLearnerConfig(
        **SMALL,
        buffer_size=128,
        batch_size=32,
        calibration_events=256,
        average_every_steps=every,
        average_address=f"tcp://127.0.0.1:{port}",
        average_timeout_s=20.0,
    )
    learner = build_learner(config, node_id=f"hlt-{index}", node_index=index, node_count=count)
    rng = np.random.default_rng(100 + index)  # each node sees different events
    for _ in range(4 + 2 * index):  # and node 1 more of them: more rounds due
        features = rng.uniform(0.1, 0.9, (300, 8)).astype("f4")
        features[:, 0] = rng.uniform(2500, 4500, 300)
        learner.learn(
            EventBatch(
                {
                    "run": np.full(300, 1, "<u4"),
                    "lumi": np.full(300, 1, "<u4"),
                    "event": np.arange(300, dtype="<u8"),
                    "features": features,
                }
            )
        )
    snapshots = [FlowSnapshot.from_record(r) for r in learner.finish()]
    out.put((index, {s.role: dict(s.arrays) for s in snapshots}, learner.report()))


def run_stage(count: int, every: int) -> dict[int, tuple[dict, dict]]:
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    port = free_tcp_port()
    workers = [
        context.Process(target=run_node, args=(i, count, every, port, out)) for i in range(count)
    ]
    for worker in workers:
        worker.start()
    results = {}
    for _ in workers:
        index, arrays, report = out.get(timeout=120)
        results[index] = (arrays, report)
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    return results


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_nodes_publish_one_averaged_flow() -> None:
    results = run_stage(2, every=4)
    (flows_0, report_0), (flows_1, report_1) = results[0], results[1]
    for role in ROLES:
        assert flows_0[role].keys() == flows_1[role].keys()
        for name, value in flows_0[role].items():
            if name.startswith(("param/", "pre/")):
                np.testing.assert_array_equal(value, flows_1[role][name], err_msg=name)
    assert report_0["average_rounds"] >= 3 and report_0["average_failures"] == 0
    assert report_0["average_live_nodes"] == 2 == report_1["average_live_nodes"]
    # Without averaging the two nodes' flows differ (the test above could fail).
    alone = run_stage(2, every=0)
    assert not np.array_equal(
        alone[0][0]["all"]["pre/lower"], alone[1][0]["all"]["pre/lower"]
    ) or any(
        not np.array_equal(v, alone[1][0]["all"][k])
        for k, v in alone[0][0]["all"].items()
        if k.startswith("param/")
    )


def run_survivor(port: int, newcomer_done: Any, out: Any) -> None:
    """Node 0: learns until the restarted node 1 has learned its share, then finishes."""
    learner = _learner(0, port)
    rng = np.random.default_rng(100)
    for _ in range(400):  # bounded: the test fails rather than hangs
        learner.learn(_batch(rng))
        if newcomer_done.is_set():
            break
    _finish(0, learner, out)


def run_dying_node(port: int) -> None:
    """Node 1's first life: a few batches, then gone without a word (as after kill -9)."""
    import os

    learner = _learner(1, port)
    rng = np.random.default_rng(101)
    for _ in range(3):
        learner.learn(_batch(rng))
    os._exit(0)


def run_newcomer(port: int, newcomer_done: Any, out: Any) -> None:
    """Node 1 restarted: joins the running group and learns its share."""
    learner = _learner(1, port)
    rng = np.random.default_rng(102)
    for _ in range(4):
        learner.learn(_batch(rng))
    newcomer_done.set()
    _finish(1, learner, out)


def _learner(index: int, port: int) -> Any:
    import torch

    from nodes.learner import FlowLearnerConfig, build_learner

    torch.set_num_threads(1)
    config = FlowLearnerConfig(
        **SMALL,
        buffer_size=128,
        batch_size=32,
        calibration_events=256,
        average_every_steps=2,
        average_address=f"tcp://127.0.0.1:{port}",
        average_timeout_s=4.0,
    )
    return build_learner(config, node_id=f"hlt-{index}", node_index=index, node_count=2)


def _batch(rng: np.random.Generator) -> Any:
    from stream.batch import EventBatch

    features = rng.uniform(0.1, 0.9, (300, 8)).astype("f4")
    features[:, 0] = rng.uniform(2500, 4500, 300)
    return EventBatch(
        {
            "run": np.full(300, 1, "<u4"),
            "lumi": np.full(300, 1, "<u4"),
            "event": np.arange(300, dtype="<u8"),
            "features": features,
        }
    )


def _finish(index: int, learner: Any, out: Any) -> None:
    from models.snapshot import FlowSnapshot

    snapshots = [FlowSnapshot.from_record(r) for r in learner.finish()]
    out.put((index, {s.role: dict(s.arrays) for s in snapshots}, learner.report()))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_restarted_node_rejoins_and_both_publish_one_flow() -> None:
    """Node 1 dies; node 0 goes on alone; node 1's replacement takes the group's
    preprocessing, is admitted by node 0, adopts its flow, and the two finish as one."""
    context = multiprocessing.get_context("spawn")
    out, newcomer_done = context.Queue(), context.Event()
    port = free_tcp_port()
    survivor = context.Process(target=run_survivor, args=(port, newcomer_done, out))
    dying = context.Process(target=run_dying_node, args=(port,))
    survivor.start()
    dying.start()
    dying.join(timeout=120)
    assert dying.exitcode == 0
    newcomer = context.Process(target=run_newcomer, args=(port, newcomer_done, out))
    newcomer.start()
    results = {}
    for _ in range(2):
        index, arrays, report = out.get(timeout=180)
        results[index] = (arrays, report)
    for worker in (survivor, newcomer):
        worker.join(timeout=30)
        assert worker.exitcode == 0
    (flows_0, report_0), (flows_1, report_1) = results[0], results[1]
    assert report_1["average_live_nodes"] == 2 == report_0["average_live_nodes"]
    assert report_1["average_rounds"] >= 2
    for role in ROLES:
        for name, value in flows_0[role].items():
            if name.startswith(("param/", "pre/")):
                np.testing.assert_array_equal(value, flows_1[role][name], err_msg=name)
