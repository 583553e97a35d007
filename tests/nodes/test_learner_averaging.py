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
