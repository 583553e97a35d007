"""What makes a single-pass flow usable: OnlineFlow settings compared by the ANODE ratio.

The LHCO R&D stream of the headline benchmark (background bkg01-06 with W'->XY from
sig01-03 injected at S/B 4.7% in the signal region, shuffled once) is offered to
``--nodes`` OnlineFlows in 1000-event batches, round robin, without the source, archive or
classifiers. Each variant is then scored by the ANODE likelihood ratio log p_all - log
p_sideband of the node mixture on the labelled test events in the SR (bkg09-10,
sig04-10): AUC, max SIC (>= 25 background events) and the mean background NLL of each
flow, a direct measure of how well the flows learned.

    python -m benchmarks.online_flow_ablation [--nodes 2] [--seeds 1 2] [--variants ...]

``--dataset PATH`` streams a ``trigfarm simulate --recipe lhco-like`` dataset instead, split
by chunk as the headline splits it (``benchmarks/ephemeral_lhco.py``): the capacity study
at a million events.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analysis.data import Events
from analysis.metrics import roc
from benchmarks.ephemeral_lhco import (
    DATA,
    IDEALISED_FRACTION,
    SR,
    TEST_FRACTION,
    Dataset,
    generated_dataset,
    lhco_dataset,
)
from models.flows import FEATURE_INDICES, MJJ_INDEX, ConditionalFlow, FlowMixture
from models.online import OnlineConfig, OnlineFlow
from simulator.replay import read_features

# Each variant changes the shipped defaults (OnlineConfig()) in the fields named.
BEFORE = {
    "hidden_features": 32,
    "n_members": 1,
    "batch_size": 64,
    "decay_start_steps": 300,
    "average_decay": 0.0,
}
FAST = {
    "batch_size": 256,
    "learning_rate": 1e-2,
    "decay_start_steps": 75,
    "average_decay": 0.98,
    "replay": 1,
}
VARIANTS: dict[str, dict[str, Any]] = {
    "last-iterate": BEFORE,
    "polyak": {**BEFORE, "average_decay": 0.995},
    "polyak+5-members": {**BEFORE, "average_decay": 0.995, "hidden_features": 16, "n_members": 5},
    "polyak+5-members+batch-16": {
        "batch_size": 16,
        "learning_rate": 2e-3,
        "decay_start_steps": 1200,
        "average_decay": 0.995,
        "replay": 1,
    },
    # Larger minibatches, now that a step costs little more at 256 than at 16 (models.maf):
    # the schedule keeps its horizon in events, not steps.
    "batch-256": {
        "batch_size": 256,
        "learning_rate": 2e-3,
        "decay_start_steps": 75,
        "average_decay": 0.98,
        "replay": 1,
    },
    "batch-256+lr-5e-3": {
        "batch_size": 256,
        "learning_rate": 5e-3,
        "decay_start_steps": 75,
        "average_decay": 0.98,
        "replay": 1,
    },
    "batch-256+replay-4": {
        "batch_size": 256,
        "learning_rate": 2e-3,
        "decay_start_steps": 300,
        "average_decay": 0.99,
        "replay": 4,
    },
    "batch-256+lr-1e-2": {
        "batch_size": 256,
        "learning_rate": 1e-2,
        "decay_start_steps": 75,
        "average_decay": 0.98,
        "replay": 1,
    },
    "batch-256+lr-1e-2+replay-2": {
        "batch_size": 256,
        "learning_rate": 1e-2,
        "decay_start_steps": 150,
        "average_decay": 0.98,
        "replay": 2,
    },
    "batch-512+lr-1e-2+replay-2": {
        "batch_size": 512,
        "learning_rate": 1e-2,
        "decay_start_steps": 75,
        "average_decay": 0.98,
        "replay": 2,
    },
    "batch-128+lr-5e-3": {
        "batch_size": 128,
        "learning_rate": 5e-3,
        "decay_start_steps": 150,
        "average_decay": 0.98,
        "replay": 1,
    },
    # Capacity at the fast setting (batch 256, lr 1e-2):
    "wider-32": {**FAST, "hidden_features": 32},
    "wider-64": {**FAST, "hidden_features": 64},
    "deeper-6": {**FAST, "n_transforms": 6},
    "3-members": {**FAST, "n_members": 3},
    "8-members": {**FAST, "n_members": 8},
    "batch-1024+lr-2e-2": {
        **FAST,
        "batch_size": 1024,
        "learning_rate": 2e-2,
        "decay_start_steps": 20,
        "average_decay": 0.95,
    },
    "batch-64": {
        "batch_size": 64,
        "learning_rate": 2e-3,
        "decay_start_steps": 300,
        "average_decay": 0.99,
        "replay": 1,
    },
}


def lhco_stream(dataset: Dataset, s_over_b: float, seed: int) -> tuple[np.ndarray, Events, Events]:
    """Stream features (N, 8), shuffled; the labelled test events in the SR; and the
    validation background in the SR (the idealised background: bkg07-08 of LHCO, which no
    flow trains on), on which settings are chosen."""
    background = Events(*read_features([dataset.stream_background]))
    signal = Events(*read_features([dataset.injected_signal]))
    test = Events(*read_features(list(dataset.test)))
    n_signal = int(s_over_b * background.in_window(SR).sum() / signal.in_window(SR).mean())
    rng = np.random.default_rng(seed)
    chosen = signal.features[rng.permutation(len(signal))[:n_signal]]
    stream = np.concatenate([background.features, chosen])
    validation = Events(*read_features([dataset.idealised_background]))
    return (
        stream[rng.permutation(len(stream))].astype(np.float32),
        test.select(test.in_window(SR)),
        validation.select(validation.in_window(SR)),
    )


def score(
    all_flows: list[ConditionalFlow],
    sideband_flows: list[ConditionalFlow],
    events_seen: list[int],
    test_sr: Events,
    validation_sr: Events,
) -> dict[str, float]:
    """ANODE AUC and max SIC of the node mixtures on the labelled SR test events, the mean
    test-background NLL of each mixture, and the all-data mixture's mean NLL on the
    validation background (what settings are chosen by). NLLs are over the events inside
    the flows' calibrated bounds (outside, the density is 0); those outside are counted."""
    mixture = FlowMixture(all_flows, events_seen)
    valid_x, valid_mjj = (
        validation_sr.features[:, FEATURE_INDICES],
        validation_sr.features[:, MJJ_INDEX],
    )
    log_valid = mixture.log_prob(valid_x, valid_mjj)
    inside = np.isfinite(log_valid)  # events outside the calibrated bounds have density 0
    nll_validation = float(-log_valid[inside].mean())
    x, mjj = test_sr.features[:, FEATURE_INDICES], test_sr.features[:, MJJ_INDEX]
    log_all = mixture.log_prob(x, mjj)
    log_sideband = FlowMixture(sideband_flows, events_seen).log_prob(x, mjj)
    assert test_sr.is_signal is not None
    curve = roc(np.nan_to_num(log_all - log_sideband, nan=-np.inf), test_sr.is_signal)
    background = ~test_sr.is_signal
    kept = background & np.isfinite(log_all) & np.isfinite(log_sideband)
    return {
        "anode_auc": curve.auc,
        "anode_max_sic": curve.max_sic(),
        "nll_background_all": float(-log_all[kept].mean()),
        "nll_background_sideband": float(-log_sideband[kept].mean()),
        "test_background_outside_bounds": int((background & ~kept).sum()),
        "nll_validation_all": nll_validation,
        "validation_outside_bounds": int((~inside).sum()),
    }


def run_variant(
    config: OnlineConfig, stream: np.ndarray, test_sr: Events, validation_sr: Events, n_nodes: int
) -> dict[str, float]:
    nodes = [OnlineFlow(config) for _ in range(n_nodes)]
    t0 = time.perf_counter()
    for i, start in enumerate(range(0, len(stream), 1000)):
        nodes[i % n_nodes].learn(stream[start : start + 1000])
    for node in nodes:
        node.finish()
    train_s = time.perf_counter() - t0

    result = score(
        [node.trainers["all"].estimate for node in nodes],
        [node.trainers["sideband"].estimate for node in nodes],
        [node.trainers["all"].stats.offered for node in nodes],
        test_sr,
        validation_sr,
    )
    return {
        **result,
        "steps_per_flow": nodes[0].trainers["all"].stats.steps,
        "train_s": train_s,
        "events_per_s_per_node": len(stream) / train_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sb", type=float, default=0.05, help="S/B in the SR")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--dataset",
        type=Path,
        help="a `trigfarm simulate --recipe lhco-like` folder instead of LHCO (split by chunk "
        "as in ephemeral_lhco)",
    )
    args = parser.parse_args(argv)
    if args.dataset:
        dataset = generated_dataset(args.dataset.expanduser(), TEST_FRACTION, IDEALISED_FRACTION)
    elif DATA.exists():
        dataset = lhco_dataset(quick=False)
    else:
        print(f"no data at {DATA} (see ../shared/data/README.md)")
        return 1
    torch.set_num_threads(1)
    stream, test_sr, validation_sr = lhco_stream(dataset, args.sb, seed=1)
    print(
        f"{dataset.name}: {len(stream)} stream events; test SR {len(test_sr)} events; "
        f"validation SR {len(validation_sr)}; {args.nodes} nodes"
    )
    rows = []
    for name in args.variants:
        for seed in args.seeds:
            config = replace(
                OnlineConfig(calibration_events=2000, buffer_size=2048),
                **VARIANTS[name],
                seed=seed,
            )
            row = {
                "variant": name,
                "seed": seed,
                **run_variant(config, stream, test_sr, validation_sr, args.nodes),
            }
            rows.append(row)
            print(
                f"{name:28s} seed {seed}: ANODE AUC {row['anode_auc']:.3f} max SIC "
                f"{row['anode_max_sic']:.2f}; background NLL all {row['nll_background_all']:.4f} "
                f"sideband {row['nll_background_sideband']:.4f}; validation NLL "
                f"{row['nll_validation_all']:.4f}; {row['steps_per_flow']} steps, "
                f"{row['train_s']:.0f} s",
                flush=True,
            )
    final = {
        "benchmark": "online_flow_ablation",
        "nodes": args.nodes,
        "s_over_b": args.sb,
        "dataset": dataset.name,
        "machine": f"{platform.machine()}, 1 torch thread",
        "rows": rows,
    }
    print(json.dumps(final, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
