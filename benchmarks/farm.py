"""Farm benchmark: sustained input rate without drops, per-stage rates and latencies, CPU per
node, and how the sustained rate scales with the number of HLT nodes.

The physics source (Pythia + FastJet in the loop) makes ~100 events/s per core, far below
what the trigger chain can take, so the source here replays a small pre-simulated event
cache (QCD with a 5% W' signal; made once with ``simulate_to_file``) in a loop. Then:

1. capacity: the farm runs unpaced with back-pressure; the rate through the slowest stage
   (in source events per second, ``chain_rate``) is the most the chain can take;
2. sustained: the source is paced at 80% of that with every later stage set to *drop*
   what it cannot take at once (``drop_when_full``), so any overload shows up as drops
   (and the source reports whether it kept its pace);
3. scaling: the capacity run is repeated with 1, 2 and 4 HLT nodes.

    python -m benchmarks.farm                       # the default topology
    python -m benchmarks.farm --topology synthetic  # the machinery alone

Prints a table per run and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from deploy.report import format_report
from deploy.run import run_farm
from deploy.topology import Topology, load_topology


def make_cache(folder: Path, n_background: int, n_signal: int) -> tuple[str, str]:
    """Simulate the replayed events once (QCD background, W' signal)."""
    from simulator.production import simulate_to_file

    background, signal = folder / "qcd.h5", folder / "wprime.h5"
    if not background.exists():
        simulate_to_file("qcd", n_background, background, seed=11, progress=False)
    if not signal.exists():
        simulate_to_file("wprime", n_signal, signal, seed=12, progress=False)
    return str(background), str(signal)


def with_replay(
    topology: Topology, files: tuple[str, str] | None, rate_hz: float, batch: int
) -> Topology:
    first = topology.stages[0]
    if first.role == "synthetic-source":
        config: dict[str, Any] = {"rate_hz": rate_hz, "events": 10**9, "batch_size": batch}
    else:
        assert files is not None
        config = {
            "background": [f"cache:{files[0]}"],
            "signal": [f"cache:{files[1]}"],
            "signal_fraction": 0.05,
            # The cached events are unweighted hard-scatter events: no crossing weights,
            # no pileup (the default farm's source weights generated crossings).
            "weighting": "unit",
            "pileup_mu": 0.0,
            "loop": True,
            "rate_hz": rate_hz,
            "batch_size": batch,
            "max_events": 0,
        }
    return topology.with_changes(**{first.name: {"config": config}})


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The figures kept in the JSON line."""
    stages = {}
    for s in report["stages"]:
        stages[s["stage"]] = {
            "nodes": s["count"],
            "events_in": s["events_in"],
            "rate_hz": round(s["rate_hz"], 1),
            "accept_fraction": s["accept_fraction"],
            "dropped": s["dropped"],
            "latency_p50_ms": None if s["latency_p50_s"] is None else 1e3 * s["latency_p50_s"],
            "latency_p99_ms": None if s["latency_p99_s"] is None else 1e3 * s["latency_p99_s"],
            "cpu_s": {n["name"]: n.get("cpu_s") for n in s["nodes"]},
            "cpu_fraction": {
                n["name"]: (n.get("cpu_s") or 0) / report["wall_s"] for n in s["nodes"]
            },
            "busy_fraction": {n["name"]: n["busy_fraction"] for n in s["nodes"]},
            "blocked_fraction": {n["name"]: n["blocked_fraction"] for n in s["nodes"]},
        }
    return {
        "wall_s": round(report["wall_s"], 2),
        "events": report["events_generated"],
        "source_rate_hz": round(report["stages"][0]["rate_hz"], 1),
        "chain_rate_hz": round(chain_rate(report), 1),
        "balanced": report["accounting"]["balanced"],
        "dropped_total": sum(sum(s["dropped"].values()) for s in report["stages"]),
        "stages": stages,
    }


def chain_rate(report: dict[str, Any]) -> float:
    """Source events per second through the slowest stage.

    Each stage's input rate (over its own first-to-last batch) is scaled by the share of
    source events that reach it (the archive sees only HLT accepts). The source's own
    rate is not used: with back-pressure it first fills the link queues faster than the
    chain drains them.
    """
    source_events = report["stages"][0]["events_in"]
    rates = [
        s["rate_hz"] * source_events / s["events_in"]
        for s in report["stages"][1:]
        if s["events_in"] > 0 and s["rate_hz"] > 0
    ]
    return min(rates) if rates else report["stages"][0]["rate_hz"]


def run_once(topology: Topology, out: Path, duration_s: float) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)  # the cache next to it is kept
    outcome = run_farm(topology, out_dir=out, duration_s=duration_s)
    print(format_report(outcome.report))
    print()
    return summary(outcome.report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="default")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per run")
    parser.add_argument("--hlt-counts", default="1,2,4")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--cache-events", type=int, default=2000)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    base = load_topology(args.topology)
    work = Path(args.out or tempfile.mkdtemp(prefix="trigfarm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    files = None
    if base.stages[0].role == "source":
        files = make_cache(work, args.cache_events, max(args.cache_events // 10, 100))
    scaled = "hlt" if any(s.name == "hlt" for s in base.stages) else base.stages[1].name

    results: dict[str, Any] = {"topology": base.farm.name, "scaled_stage": scaled, "scaling": {}}
    for count in [int(c) for c in args.hlt_counts.split(",")]:
        print(f"== capacity with {count} {scaled} node(s), unpaced, back-pressure")
        topology = with_replay(base, files, 0.0, args.batch_size).with_changes(
            **{scaled: {"count": count}}
        )
        results["scaling"][count] = run_once(topology, work / f"capacity-{count}", args.duration)

    default_count = base.stage(scaled).count
    capacity = results["scaling"].get(default_count, next(iter(results["scaling"].values())))
    rate = 0.8 * capacity["chain_rate_hz"]
    print(f"== sustained: paced at {rate:.0f} events/s (80% of capacity), drop when full")
    topology = with_replay(base, files, rate, args.batch_size)
    # Every stage after the source drops what it cannot take at once; the source itself
    # blocks (it would only drop batches sent before the first peer connects), so it
    # shows overload as a rate below its target instead.
    topology = topology.with_changes(
        **{s.name: {"drop_when_full": True} for s in topology.stages[1:]}
    )
    sustained = run_once(topology, work / "sustained", args.duration)
    sustained["no_drops"] = sustained["dropped_total"] == 0
    sustained["kept_pace"] = sustained["source_rate_hz"] >= 0.97 * rate
    results["sustained"] = {"target_rate_hz": round(rate, 1), **sustained}
    print(json.dumps(results, default=float))


if __name__ == "__main__":
    main()
