"""Chaos benchmark: a farm runs for a few minutes while random faults hit it.

Every ~``--interval`` seconds (uniform jitter of ±50%, seeded) one of:

- ``kill``: ``kill -9`` of a random L1 or HLT node;
- ``pause``: SIGSTOP of a random L1 or HLT node (the launcher expires it);
- ``archive``: ``kill -9`` of the archive (the launcher restarts it);
- ``garbage``: a burst of malformed frames into the archive (an extra input it binds).

A lost node of a stage with survivors is taken out (restarted with
``--restart-every-node``: a restarted HLT node rejoins the averaging group); one whose
stage would be empty is restarted. At the end the script checks the books and the
archive and prints, per fault, the time to detect it (fault → launcher's verdict) and to
recover (verdict → the restarted node running; a taken-out node's share is rerouted at
once), the events lost
(``dropped["node_lost"]``, an estimate, against the in-flight bound of the lost nodes),
the flow snapshots lost (goal 0; with receipts, a copy lost in flight is sent again and
only an undeliverable or unconfirmed one is lost) and whether every HLT node that ended
cleanly has its final flows in a verified archive.

    python -m benchmarks.chaos                      # default farm, 180 s, seed 0
    python -m benchmarks.chaos --topology replay --duration 120 --seed 1

The malformed frames reach the archive outside the HLT → archive link, so that link's
``received`` exceeds ``sent`` by exactly their number (checked), and the archive's
``node_lost`` estimate is low by the frames its lost processes had counted (corrected
here). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from deploy.launcher import Farm, NodeStatus, plan_farm
from deploy.report import build_report, format_report, write_report
from deploy.roles import ROLES
from deploy.topology import load_topology
from models.archive import Archive
from stream.transport import free_tcp_port

FAULTS = ("kill", "pause", "archive", "garbage")
GARBAGE_PER_BURST = 500


def malformed(rng: np.random.Generator) -> list[bytes]:
    """A message no decoder accepts: random bytes, an empty frame list's stand-in, or a
    header-only frame with no buffers."""
    kind = int(rng.integers(3))
    if kind == 0:
        return [rng.bytes(int(rng.integers(1, 300)))]
    if kind == 1:
        return [b"\xc1"]  # a byte msgpack never uses
    return [b"\x81\xa1v\xc3"]  # {"v": True}: a bool is not a schema version


class Chaos:
    """The ``on_update`` hook that injects the faults and times the recoveries."""

    def __init__(self, rng: np.random.Generator, interval_s: float, garbage: str) -> None:
        self.rng = rng
        self.interval_s = interval_s
        self.faults: list[dict[str, Any]] = []
        self.recovered: dict[tuple[str, int], float] = {}  # (node, restart n) -> time
        self.garbage_sent = 0
        self._paused: set[int | None] = set()
        self._next_s: float | None = None
        self._push: zmq.Socket = zmq.Context.instance().socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, 10_000)
        self._push.setsockopt(zmq.LINGER, 5_000)
        self._push.connect(garbage)

    def close(self) -> None:
        self._push.close()

    def __call__(self, statuses: dict[str, NodeStatus]) -> None:
        now = time.monotonic()
        for name, status in statuses.items():
            beat = status.heartbeat
            key = (name, len(status.restarted))
            if status.restarted and beat and beat.state == "running" and key not in self.recovered:
                self.recovered[key] = now
        if self._next_s is None:
            running = [
                s for s in statuses.values() if s.heartbeat and s.heartbeat.state == "running"
            ]
            if len(running) == len(statuses) and statuses:
                self._next_s = now + self.interval_s
            return
        if now < self._next_s:
            return
        self._next_s = now + self.interval_s * self.rng.uniform(0.5, 1.5)
        self._inject(str(self.rng.choice(FAULTS)), statuses, now)

    def _inject(self, kind: str, statuses: dict[str, NodeStatus], now: float) -> None:
        alive = {  # a node paused here and not yet expired is no target again
            n: s
            for n, s in statuses.items()
            if s.process.is_alive()
            and not s.lost
            and s.process.pid not in self._paused
            and s.heartbeat
            and s.heartbeat.state == "running"
        }
        fault: dict[str, Any] = {"kind": kind, "at": now}
        if kind == "garbage":
            for _ in range(GARBAGE_PER_BURST):
                self._push.send_multipart(malformed(self.rng))
            self.garbage_sent += GARBAGE_PER_BURST
            fault["frames"] = GARBAGE_PER_BURST
        else:
            if kind == "archive":
                targets = [n for n, s in alive.items() if s.plan.stage.role == "archive"]
            else:
                targets = [n for n, s in alive.items() if s.plan.stage.role in ("l1", "hlt")]
            if not targets:
                return
            target = str(self.rng.choice(sorted(targets)))
            sig = signal.SIGSTOP if kind == "pause" else signal.SIGKILL
            if kind == "pause":
                self._paused.add(alive[target].process.pid)
            pid = alive[target].process.pid
            assert pid is not None
            os.kill(pid, sig)
            fault["target"] = target
            fault["restarts_before"] = len(alive[target].restarted)
        print(f"fault: {kind} {fault.get('target', '')}", flush=True)
        self.faults.append(fault)


def chaos_plan(topology_name: str, out: Path, duration_s: float, stall_after_s: float):  # type: ignore[no-untyped-def]
    """The topology, unpaced and unbounded (the run lasts ``duration_s``), with a fast
    expiry and time-based snapshots, and the archive binding an extra input for garbage."""
    topology = load_topology(topology_name, roles=ROLES)
    farm = dataclasses.replace(topology.farm, stall_after_s=stall_after_s)
    topology = dataclasses.replace(topology, farm=farm)
    source = topology.stages[0]
    source_config = {"max_events": 0}
    if source.role == "source" and "loop" in source.config:
        source_config["loop"] = True
    changes: dict[str, Any] = {source.name: {"config": source_config}}
    for stage in topology.stages:
        if stage.learner is not None:
            learner = {**stage.learner, "snapshot_every_s": 10.0}
            learner["average_timeout_s"] = min(
                learner.get("average_timeout_s", 30.0), stall_after_s
            )
            changes[stage.name] = {"learner": learner}
    topology = topology.with_changes(**changes)
    control = f"tcp://127.0.0.1:{free_tcp_port()}"
    plan = plan_farm(topology, out_dir=out, control=control)
    garbage = f"tcp://127.0.0.1:{free_tcp_port()}"
    nodes = []
    for node_plan in plan.nodes:
        if node_plan.stage.role == "archive":
            inputs = (*node_plan.node.inputs, f"@{garbage}")
            node_plan = dataclasses.replace(
                node_plan, node=dataclasses.replace(node_plan.node, inputs=inputs)
            )
        nodes.append(node_plan)
    return dataclasses.replace(plan, nodes=tuple(nodes)), garbage


MIN_EVENT_BYTES = 80  # run, lumi, event, 2 fat jets and 8 features: the smallest event


def in_flight_bound(stage: dict[str, Any], farm: Any) -> int:
    """Events one lost node can take with it: its queue, both ends' high-water marks, the
    batch it was on and one more taken in after its last heartbeat (in the stage's mean
    batch), plus what both kernel TCP buffers of its input link hold (of the smallest
    events; Linux gives each buffer twice the size asked for)."""
    batches = max(1, sum(n.get("batches_in", 0) for n in stage["nodes"]))
    batch = stage["events_in"] / batches if stage["events_in"] else 1.0
    queued = (farm.sndhwm + farm.rcvhwm + 4 + 2) * batch
    kernel = 4 * farm.socket_buffer_kib * 1024 / MIN_EVENT_BYTES  # Linux doubles each
    return int(queued + kernel)


def analyse(
    report: dict[str, Any],
    chaos: Chaos,
    started_s: float,
    out: Path,
    farm: Any,
    *,
    receipts: bool,
) -> dict[str, Any]:
    """Per-fault timings and the loss, snapshot and archive checks (``receipts``: the
    archive confirms the records it stores, ``stream.receipts``)."""
    losses = {name: list(entries) for name, entries in report["lost_nodes"].items()}
    rows = []
    for fault in chaos.faults:
        row: dict[str, Any] = {"kind": fault["kind"], "at_s": round(fault["at"] - started_s, 1)}
        target = fault.get("target")
        if target:
            row["target"] = target
            later = [
                x
                for x in losses.get(target, [])
                if x["at_s"] is not None and x["at_s"] >= row["at_s"] - 0.5
            ]
            if later:
                loss = later[0]
                losses[target].remove(loss)
                row["detected_after_s"] = round(loss["at_s"] - row["at_s"], 2)
                row["verdict"] = "restarted" if loss["restarted"] else "taken out"
                restart_n = fault["restarts_before"] + 1
                ready = chaos.recovered.get((target, restart_n))
                if loss["restarted"] and ready is not None:
                    row["recovered_after_s"] = round(ready - started_s - loss["at_s"], 2)
                elif not loss["restarted"]:
                    row["recovered_after_s"] = 0.0  # the stage's others take its share at once
            else:
                row["verdict"] = "not detected (run ended first)"
        else:
            row["frames"] = fault["frames"]
        rows.append(row)
    stages = {s["stage"]: s for s in report["stages"]}
    archive_stage = next(s for s in report["stages"] if s["role"] == "archive")
    decode_errors = archive_stage["dropped"].get("decode_error", 0)
    node_lost = {s["stage"]: s["dropped"].get("node_lost", 0) for s in report["stages"]}
    into_archive = next(link for link in report["links"] if link["to"] == archive_stage["stage"])
    if archive_stage["lost"]:  # the estimate took the garbage for link events
        node_lost[archive_stage["stage"]] += decode_errors
        garbage_link_gap = 0
    else:
        garbage_link_gap = into_archive["received"] - into_archive["sent"]
    other_links_balanced = all(
        ok
        for name, ok in report["accounting"]["links"].items()
        if not name.endswith(f"->{archive_stage['stage']}")
    )
    books_balanced = (
        all(report["accounting"]["stages"].values())
        and other_links_balanced
        and garbage_link_gap in (0, decode_errors)
    )
    lost_nodes = {s["stage"]: len(s["lost"]) for s in report["stages"]}
    bounds = {
        name: lost_nodes[name] * in_flight_bound(stage, farm) for name, stage in stages.items()
    }
    # With receipts (no CURVE) a copy lost in flight is sent again: what is lost is what
    # could not be delivered or was never confirmed; without them, every copy in flight.
    records_lost = sum(
        s["records_lost"]
        + (s["records_unconfirmed"] if receipts else s.get("records_lost_in_flight", 0))
        for s in report["stages"]
    )
    copies_resent = sum(s["records_resent"] for s in report["stages"])
    store = Archive(next(p.parent for p in out.rglob("index.sqlite")))
    problems = store.verify()
    latest = {(s.node_id, s.role) for s in store.snapshots(latest_per_node=True)}
    clean_hlt = [
        name for name, code in report["exitcodes"].items() if code == 0 and name.startswith("hlt")
    ]
    missing_flows = [n for n in clean_hlt if not {(n, "all"), (n, "sideband")} <= latest]
    # How many nodes each HLT node's last process ended averaging with (re-admissions).
    averaging = {}
    for name in clean_hlt:
        stats = json.loads((out / "nodes" / f"{name}.json").read_text())
        averaging[name] = stats["worker"].get("learner", {}).get("average_live_nodes")
    return {
        "faults": rows,
        "faults_injected": len(rows),
        "detected": sum("detected_after_s" in r for r in rows),
        "detect_s_median": _median(
            [r["detected_after_s"] for r in rows if "detected_after_s" in r]
        ),
        "recover_s_median": _median(
            [
                r["recovered_after_s"]
                for r in rows
                if r.get("verdict") == "restarted" and "recovered_after_s" in r
            ]
        ),
        "events_generated": report["events_generated"],
        "events_lost_node_lost": node_lost,
        "in_flight_bound": bounds,
        "garbage_sent": chaos.garbage_sent,
        "garbage_counted": decode_errors,
        "snapshots_lost": records_lost,
        "snapshot_copies_lost_in_flight": sum(
            s.get("records_lost_in_flight", 0) for s in report["stages"]
        ),
        "snapshots_resent": copies_resent,
        "hlt_clean_exits": clean_hlt,
        "hlt_clean_missing_final_flows": missing_flows,
        "hlt_final_averaging_group": averaging,
        "archive_problems": problems,
        "books_balanced": books_balanced,
        "accounting": report["accounting"],
    }


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--topology", default="default")
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of stream")
    parser.add_argument("--interval", type=float, default=20.0, help="mean seconds per fault")
    parser.add_argument("--stall-after", type=float, default=10.0, help="heartbeat expiry, s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--restart-every-node",
        action="store_true",
        help="restart every lost node, not only a stage's last",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/chaos"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    shutil.rmtree(args.out, ignore_errors=True)
    plan, garbage = chaos_plan(args.topology, args.out, args.duration, args.stall_after)
    chaos = Chaos(np.random.default_rng(args.seed), args.interval, garbage)
    farm = Farm(
        plan,
        duration_s=args.duration,
        on_update=chaos,
        restarts=1_000,
        restart_every_node=args.restart_every_node,
    )
    try:
        result = farm.run()
    finally:
        chaos.close()
    report = build_report(plan, result)
    # every lost process's last heartbeat stats, for checking the loss estimate by hand
    (args.out / "losses.json").write_text(json.dumps(result.losses, indent=2, default=float))
    write_report(report, args.out)
    print(format_report(report))
    figures = analyse(
        report,
        chaos,
        result.started_s,
        args.out,
        plan.topology.farm,
        receipts=any(n.node.receipts_from for n in plan.nodes),
    )
    print()
    print(f"{'fault':<9}{'target':<10}{'at s':>7}{'detect s':>10}{'recover s':>11}  verdict")
    for row in figures["faults"]:
        detect = row.get("detected_after_s")
        recover = row.get("recovered_after_s")
        print(
            f"{row['kind']:<9}{row.get('target', '-'):<10}{row['at_s']:>7.1f}"
            f"{'-' if detect is None else f'{detect:.1f}':>10}"
            f"{'-' if recover is None else f'{recover:.1f}':>11}  "
            f"{row.get('verdict', str(row.get('frames', '')) + ' frames')}"
        )
    print(
        f"events {figures['events_generated']}, lost with nodes {figures['events_lost_node_lost']} "
        f"(bound {figures['in_flight_bound']}); garbage {figures['garbage_sent']} sent, "
        f"{figures['garbage_counted']} counted; snapshots lost {figures['snapshots_lost']} "
        f"(copies lost in flight {figures['snapshot_copies_lost_in_flight']}, resent "
        f"{figures['snapshots_resent']}); "
        f"archive problems {len(figures['archive_problems'])}; missing final flows "
        f"{figures['hlt_clean_missing_final_flows']}; books balanced (garbage apart) "
        f"{figures['books_balanced']}"
    )
    print(
        json.dumps(
            {
                "benchmark": "chaos",
                "seed": args.seed,
                "topology": args.topology,
                "duration_s": args.duration,
                **figures,
            },
            default=float,
        )
    )


if __name__ == "__main__":
    main()
