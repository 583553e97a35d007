"""One flow across HLT nodes: the mixture of per-node flows against flows averaged over gloo.

The LHCO R&D stream of the OnlineFlow ablation (background bkg01-06 with W'->XY injected
at S/B 4.7% in the SR, shuffled once) is dealt in 1000-event batches, round robin, to N
HLT flow learners (``nodes.learner``), each in its own process:

- mixture: each node trains its own flows; the analysis mixes them, weighted by events;
- averaged: the nodes average their flows every ``--every`` optimizer steps and at the
  end (``average_every_steps``; FedAvg over torch.distributed's gloo on loopback), each
  stepping on 256/N events (the learner's split; ``--per-node-batch``: 256 each);

N = 1 is the single flow trained on every event. Scored as in the ablation: mean test NLL
of held-out background (all-data flow) and the ANODE ratio's AUC and max SIC on the
labelled test events in the SR.

    python -m benchmarks.federated_flows [--nodes 1 2 4] [--seeds 1 2 3] [--every 10]
        [--per-node-batch]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import time
from typing import Any

import numpy as np

from benchmarks.ephemeral_lhco import DATA
from benchmarks.online_flow_ablation import lhco_stream, score
from stream.transport import free_tcp_port


def learn_share(
    index: int,
    count: int,
    every: int,
    port: int,
    seed: int,
    batch_size: int,
    share: np.ndarray,
    out: Any,
) -> None:
    """One node: learn its share of the stream, send back its final flow snapshots."""
    import torch

    from models.snapshot import FlowSnapshot
    from nodes.learner import FlowLearnerConfig, build_learner
    from stream.batch import EventBatch

    torch.set_num_threads(1)
    config = FlowLearnerConfig(
        calibration_events=2000,
        batch_size=batch_size,
        seed=seed,
        average_every_steps=every,
        average_address=f"tcp://127.0.0.1:{port}",
        snapshot_at_lumi_end=False,
        snapshot_every_events=0,
    )
    learner = build_learner(config, node_id=f"hlt-{index}", node_index=index, node_count=count)
    t0 = time.perf_counter()
    for start in range(0, len(share), 1000):
        rows = share[start : start + 1000]
        n = len(rows)
        learner.learn(
            EventBatch(
                {
                    "run": np.ones(n, "<u4"),
                    "lumi": np.zeros(n, "<u4"),
                    "event": np.arange(n, dtype="<u8"),
                    "features": rows,
                }
            )
        )
    records = learner.finish()
    seconds = time.perf_counter() - t0
    snapshots = {s.role: s.to_bytes() for s in map(FlowSnapshot.from_record, records)}
    out.put((index, snapshots, learner.report(), seconds))


def run(
    stream: np.ndarray, n_nodes: int, every: int, seed: int, batch_size: int
) -> tuple[list, list, float]:
    """Train N nodes in N processes; returns per-node flows (all, sideband) and reports."""
    from models.snapshot import FlowSnapshot

    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    port = free_tcp_port()
    batches = [stream[i : i + 1000] for i in range(0, len(stream), 1000)]
    shares = [np.concatenate(batches[i::n_nodes]) for i in range(n_nodes)]
    workers = [
        context.Process(
            target=learn_share, args=(i, n_nodes, every, port, seed, batch_size, shares[i], out)
        )
        for i in range(n_nodes)
    ]
    for worker in workers:
        worker.start()
    results = sorted(out.get(timeout=3600) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
    flows = [
        {role: FlowSnapshot.from_bytes(blob) for role, blob in snaps.items()}
        for _, snaps, _, _ in results
    ]
    return flows, [r[2] for r in results], max(r[3] for r in results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--every", type=int, default=10, help="optimizer steps between averages")
    parser.add_argument("--sb", type=float, default=0.05)
    parser.add_argument(
        "--per-node-batch",
        action="store_true",
        help="averaged nodes step on 256 events each (not the learner's 256/N), as the "
        "mixture's nodes do",
    )
    args = parser.parse_args(argv)
    if not DATA.exists():
        print(f"no data at {DATA} (see ../shared/data/README.md)")
        return 1
    stream, test_sr, validation_sr = lhco_stream(args.sb, seed=1)
    print(f"{len(stream)} stream events; test SR {len(test_sr)} events")
    rows = []
    for n_nodes in args.nodes:
        modes = {"single": 0} if n_nodes == 1 else {"mixture": 0, "averaged": args.every}
        for mode, every in modes.items():
            # the learner gives each of N averaging nodes batch_size / N
            batch_size = 256 * n_nodes if mode == "averaged" and args.per_node_batch else 256
            for seed in args.seeds:
                flows, reports, seconds = run(stream, n_nodes, every, seed, batch_size)
                weights = [s["all"].events_seen for s in flows]
                row = {
                    "nodes": n_nodes,
                    "mode": mode,
                    "seed": seed,
                    "batch_size": batch_size,
                    "wall_s": seconds,
                    "average_rounds": reports[0].get("average_rounds", 0),
                    **score(
                        [s["all"].flow() for s in flows],
                        [s["sideband"].flow() for s in flows],
                        weights,
                        test_sr,
                        validation_sr,
                    ),
                }
                rows.append(row)
                print(
                    f"{n_nodes} nodes {mode:8s} seed {seed}: background NLL "
                    f"{row['nll_background_all']:.4f}, ANODE AUC {row['anode_auc']:.3f}, "
                    f"max SIC {row['anode_max_sic']:.2f} ({row['average_rounds']} averages, "
                    f"{seconds:.0f} s)",
                    flush=True,
                )
    summary: dict[str, dict[str, float]] = {}
    for key in sorted({(r["nodes"], r["mode"]) for r in rows}):
        chosen = [r for r in rows if (r["nodes"], r["mode"]) == key]
        summary[f"{key[0]}-{key[1]}"] = {
            f"{m}_{stat}": float(fn([r[m] for r in chosen]))
            for m in ("nll_background_all", "anode_auc", "anode_max_sic")
            for stat, fn in (("mean", np.mean), ("std", np.std))
        }
        print(key, summary[f"{key[0]}-{key[1]}"])
    print(
        json.dumps(
            {
                "benchmark": "federated_flows",
                "machine": f"{platform.machine()}, 1 torch thread per node",
                "every": args.every,
                "per_node_batch": args.per_node_batch,
                "summary": summary,
                "rows": rows,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
