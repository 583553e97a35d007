"""The run report: per-stage rates, latencies, accept fractions, archive bytes and accounting.

Built from the nodes' final stats files (not from heartbeats, which may miss the end), so
the accounting is exact: at every node and every stage, in = accepted + rejected +
dropped (by reason), and on every link the events one stage sent equal the events the
next stage received. A lost node wrote no stats file: its books come from its last
heartbeat, and what it took with it (in its queues and sockets, or taken in after that
heartbeat) is the difference on its links, counted as ``dropped["node_lost"]`` of its
stage and marked as an estimate. ``report.json`` holds the figures and ``dashboard.png``
plots them.

Rates in Hz stand beside the exact counts: every node sums its events' truth weights
(``NodeStats.weight_in``/``weight_out``) and the L1 and HLT workers those of each trigger
path. With the source's ``hz_per_weight`` (L x 1e-27 cm^2/mb for cross-section weights,
the crossing rate for unit weights; see ``nodes.source``) and the N events it emitted, a
stage's input and output rates and each path's rate are ``hz_per_weight * sum(w) / N``,
with the statistical error ``hz_per_weight * sqrt(sum(w^2)) / N``. A path that fired on no
event gets an upper limit instead of 0 +- 0: the rate of 1.84 events (the upper edge of
the central 68.3% Poisson interval for none seen) of the stage input's mean weight.

For each signal process, ``signal_efficiencies`` gives the share of its events that each
trigger stage accepted and that fired each path, of the events the stage saw and of
those the first trigger stage saw (the produced ones, unless a node was lost), with
Clopper-Pearson 68.3% intervals (``nodes.signal_paths``).
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from deploy.launcher import FarmPlan, FarmResult
from deploy.roles import ROLES
from nodes.signal_paths import SEEN
from stream.version import version


def _dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _node_figures(name: str, stats: Mapping[str, Any] | None, wall_s: float) -> dict[str, Any]:
    if stats is None:
        return {"name": name, "missing": True, "balanced": False}
    dropped = dict(stats.get("dropped", {}))
    n_in = int(stats["events_in"])
    accounted = int(stats["accepted"]) + int(stats["rejected"]) + sum(dropped.values())
    first, last = stats.get("first_in_s"), stats.get("last_in_s")
    active = (last - first) if first is not None and last is not None else 0.0
    latency = stats.get("latency", {})
    return {
        "name": name,
        "events_in": n_in,
        "batches_in": int(stats.get("batches_in", 0)),
        "accepted": int(stats["accepted"]),
        "rejected": int(stats["rejected"]),
        "dropped": dropped,
        "events_out": dict(stats.get("events_out", {})),
        "records_in": int(stats.get("records_in", 0)),
        "records_out": dict(stats.get("records_out", {})),
        "records_lost": dict(stats.get("records_lost", {})),
        "records_resent": dict(stats.get("records_resent", {})),
        "records_unconfirmed": int(stats.get("records_unconfirmed", 0)),
        "balanced": n_in == accounted,
        "first_in_s": first,
        "last_in_s": last,
        "rate_hz": n_in / active if active > 0 else 0.0,
        "latency_p50_s": latency.get("p50_s"),
        "latency_p99_s": latency.get("p99_s"),
        "batches": latency.get("count", 0),
        "cpu_s": stats.get("cpu_s"),
        "busy_fraction": stats.get("busy_s", 0.0) / wall_s if wall_s > 0 else 0.0,
        "blocked_fraction": stats.get("blocked_s", 0.0) / wall_s if wall_s > 0 else 0.0,
        # The node's own count (every refusal, by reason), not the ZAP guard's share of it.
        "curve_refused": sum(stats.get("curve_refused", {}).values()),
        "weight_in": list(stats.get("weight_in", [0.0, 0.0])),
        "weight_out": {k: list(v) for k, v in stats.get("weight_out", {}).items()},
        "worker": stats.get("worker", {}),
    }


_SUMMED = (
    "events_in",
    "batches_in",
    "accepted",
    "rejected",
    "records_in",
    "records_unconfirmed",
    "busy_s",
    "blocked_s",
    "cpu_s",
)
_COUNTED = ("dropped", "events_out", "records_out", "records_lost", "records_resent")


def _merge_stats(parts: list[Mapping[str, Any]]) -> dict[str, Any] | None:
    """One node's books over its processes (a restarted node had several); the last
    process gives the rest (latency, worker figures)."""
    parts = [p for p in parts if p]
    if not parts:
        return None
    merged = dict(parts[-1])
    for key in _SUMMED:
        merged[key] = sum(p.get(key) or 0 for p in parts)
    for key in _COUNTED:
        total: Counter[str] = Counter()
        for part in parts:
            total.update(part.get(key, {}))
        merged[key] = dict(total)
    merged["weight_in"] = _sum_pairs([p.get("weight_in", [0.0, 0.0]) for p in parts])
    ports = {port for p in parts for port in p.get("weight_out", {})}
    merged["weight_out"] = {
        port: _sum_pairs([p.get("weight_out", {}).get(port, [0.0, 0.0]) for p in parts])
        for port in ports
    }
    firsts = [p["first_in_s"] for p in parts if p.get("first_in_s") is not None]
    lasts = [p["last_in_s"] for p in parts if p.get("last_in_s") is not None]
    merged["first_in_s"] = min(firsts) if firsts else None
    merged["last_in_s"] = max(lasts) if lasts else None
    return merged


def _node_stats(name: str, result: FarmResult) -> tuple[dict[str, Any] | None, list[dict]]:
    """A node's merged stats (final file plus the last heartbeats of its lost processes)
    and its losses (without their stats). The final file is the last process's: if that
    process was lost after writing it (killed while lingering), the file replaces its
    last heartbeat rather than adding to it."""
    losses = result.losses.get(name, [])
    final = result.stats.get(name)
    parts = [x["stats"] for x in losses if x["restarted"] or final is None]
    if final is not None:
        parts.append(final)
    return _merge_stats(parts), [{k: v for k, v in x.items() if k != "stats"} for x in losses]


def _estimate_node_losses(stages: list[dict[str, Any]]) -> None:
    """Close the books of degraded stages from their links (see the module doc): what a
    degraded stage was sent and did not account for is ``dropped["node_lost"]``, less
    what the next stage received beyond what its nodes reported sending (sent after a
    lost node's last heartbeat: accepted)."""
    for i, stage in enumerate(stages):
        if not stage["lost"]:
            continue
        port = ROLES[stage["role"]].output_port or ""
        after = stages[i + 1] if i + 1 < len(stages) else None
        gap_out = 0
        if after is not None and not after["lost"]:
            gap_out = max(0, after["events_in"] - stage["events_out"].get(port, 0))
            extra_records = max(0, after["records_in"] - stage["records_out"])
            stage["records_out"] += extra_records
        if i == 0:
            gap_in = gap_out  # a lost source made what it sent after its last heartbeat
        else:
            sent = stages[i - 1]["events_out"].get(
                ROLES[stages[i - 1]["role"]].output_port or "", 0
            )
            gap_in = sent - stage["events_in"]
            records_gap = stages[i - 1]["records_out"] - stage["records_in"]
            if records_gap > 0:
                stage["records_lost_in_flight"] = records_gap
        stage["events_in"] += gap_in
        stage["accepted"] += gap_out
        if gap_out:
            stage["events_out"][port] = stage["events_out"].get(port, 0) + gap_out
        if gap_in - gap_out:
            stage["dropped"]["node_lost"] = stage["dropped"].get("node_lost", 0) + gap_in - gap_out
        stage["node_lost_estimated"] = True
        n_in = stage["events_in"]
        stage["accept_fraction"] = stage["accepted"] / n_in if n_in else None
        accounted = stage["accepted"] + stage["rejected"] + sum(stage["dropped"].values())
        stage["balanced"] = n_in == accounted and all(
            n["balanced"] for n in stage["nodes"] if not n.get("lost")
        )


def _sum_pairs(pairs: list[Any]) -> list[float]:
    """Element-wise sum of [sum w, sum w^2] pairs."""
    return [float(sum(p[0] for p in pairs)), float(sum(p[1] for p in pairs))]


def _sum_path_weights(workers: list[Mapping[str, Any]]) -> dict[str, list[float]]:
    """[sum w, sum w^2] per trigger path, from worker reports that give ``paths_weight``
    (HLT) or ``fired_weight`` (L1)."""
    total: dict[str, list[float]] = {}
    for worker in workers:
        paths = worker.get("paths_weight") or worker.get("fired_weight") or {}
        for key, pair in paths.items():
            total[str(key)] = _sum_pairs([total.get(str(key), [0.0, 0.0]), pair])
    return total


def rate_normalisation(source_worker: Mapping[str, Any], n_source: int) -> dict[str, Any]:
    """How weights become Hz in this run: ``hz_per_weight`` over the source's N events
    (unit weights at 40 MHz when the source reports nothing, as an old one would)."""
    return {
        "weighting": source_worker.get("weighting", "unit"),
        "hz_per_weight": float(source_worker.get("hz_per_weight", 40e6)),
        "luminosity_cm2s": source_worker.get("luminosity_cm2s"),
        "crossing_rate_hz": source_worker.get("crossing_rate_hz", 40e6),
        "source_events": n_source,
        "pileup": source_worker.get("pileup"),
    }


#: The confidence level of every interval in the report (one standard deviation).
CONFIDENCE_LEVEL = 0.683
#: Events at the upper edge of the central 68.3% Poisson interval when none is seen.
NONE_SEEN_UPPER_EVENTS = float(stats.chi2.ppf(0.5 + CONFIDENCE_LEVEL / 2, 2) / 2)


def weighted_rate(
    pair: list[float], norm: Mapping[str, Any], *, mean_weight: float = 0.0
) -> dict[str, float]:
    """Rate and statistical error in Hz of [sum w, sum w^2] (see the module doc); with
    no weight and a ``mean_weight`` of the events that could have fired, also
    ``upper_hz``, the rate of ``NONE_SEEN_UPPER_EVENTS`` such events."""
    n = norm["source_events"]
    if not n:
        return {"rate_hz": 0.0, "error_hz": 0.0}
    k = norm["hz_per_weight"] / n
    rate = {"rate_hz": k * pair[0], "error_hz": k * float(np.sqrt(pair[1]))}
    if pair[0] == 0 and mean_weight > 0:
        rate["upper_hz"] = k * mean_weight * NONE_SEEN_UPPER_EVENTS
    return rate


def reduction(weight_in: list[float], weight_out: list[float]) -> dict[str, float] | None:
    """A stage's rate reduction ``R_in / R_out`` and its statistical error, from the
    weights in and out ([sum w, sum w^2]; the events out are a subset of those in): the
    efficiency e = w_out / w_in has the variance
    ``((1 - e)^2 sum_out w^2 + e^2 sum_rest w^2) / w_in^2``, and the reduction is 1 / e."""
    if not weight_out[0] > 0 or not weight_in[0] > 0:
        return None
    e = weight_out[0] / weight_in[0]
    rest2 = max(weight_in[1] - weight_out[1], 0.0)
    var = ((1 - e) ** 2 * weight_out[1] + e**2 * rest2) / weight_in[0] ** 2
    return {"reduction": 1.0 / e, "error": float(np.sqrt(var)) / e**2, "efficiency": e}


def _add_rates(stages: list[dict[str, Any]], norm: Mapping[str, Any]) -> None:
    for stage in stages:
        present = [n for n in stage["nodes"] if not n.get("missing")]
        weight_in = _sum_pairs([n["weight_in"] for n in present])
        port = ROLES[stage["role"]].output_port or ""
        weight_out = _sum_pairs([n["weight_out"].get(port, [0.0, 0.0]) for n in present])
        stage["weight_in"], stage["weight_out"] = weight_in, weight_out
        stage["rate_in"] = weighted_rate(weight_in, norm)
        stage["rate_out"] = weighted_rate(weight_out, norm)
        stage["reduction"] = reduction(weight_in, weight_out)
        path_weights = _sum_path_weights([n["worker"] for n in present])
        stage["path_weights"] = path_weights
        # Over the nodes whose weights are known, as weight_in is (a lost node's estimated
        # events, which stage["events_in"] includes, carry no weight).
        n_in = sum(n["events_in"] for n in present)
        mean_weight = weight_in[0] / n_in if n_in else 0.0
        stage["path_rates"] = {
            p: weighted_rate(w, norm, mean_weight=mean_weight) for p, w in path_weights.items()
        }
        stage["lumi_rates"] = lumi_rates([n["worker"] for n in present])


def lumi_rates(workers: list[Mapping[str, Any]]) -> dict[str, list[list[float]]]:
    """Per path, ``[lumi, rate_hz, error_hz]`` of every closed lumi block, summed over a
    stage's nodes (each node's rate is its share; errors add in quadrature)."""
    total: dict[tuple[str, int], list[float]] = {}
    for worker in workers:
        for row in worker.get("lumi_rates") or []:
            try:
                key = (str(row["path"]), int(row["lumi"]))
                rate, error = float(row["rate_hz"]), float(row["error_hz"])
            except (KeyError, TypeError, ValueError):
                continue
            sums = total.setdefault(key, [0.0, 0.0])
            sums[0] += rate
            sums[1] += error**2
    out: dict[str, list[list[float]]] = {}
    for (path, lumi), (rate, error2) in sorted(total.items()):
        out.setdefault(path, []).append([float(lumi), rate, float(np.sqrt(error2))])
    return out


def _sum_paths(workers: list[Mapping[str, Any]]) -> dict[str, int]:
    """Events per trigger path, from worker reports that give ``paths`` (HLT) or
    ``fired`` (L1 seeds); an event may fire several paths."""
    total: Counter[str] = Counter()
    for worker in workers:
        paths = worker.get("paths") or worker.get("fired") or {}
        if isinstance(paths, Mapping):
            for key, value in paths.items():
                if isinstance(value, int | float):
                    total[str(key)] += int(value)
    return dict(total)


def build_report(plan: FarmPlan, result: FarmResult) -> dict[str, Any]:
    """The run report as plain data (see the module doc)."""
    stages = []
    for stage in plan.topology.stages:
        nodes = []
        for p in plan.stage_nodes(stage.name):
            stats, losses = _node_stats(p.node.name, result)
            figures = _node_figures(p.node.name, stats, result.wall_s)
            if losses:
                figures["lost"] = losses
            nodes.append(figures)
        present = [n for n in nodes if not n.get("missing")]
        dropped: Counter[str] = Counter()
        events_out: Counter[str] = Counter()
        for node in present:
            dropped.update(node["dropped"])
            events_out.update(node["events_out"])
        n_in = sum(n["events_in"] for n in present)
        accepted = sum(n["accepted"] for n in present)
        rejected = sum(n["rejected"] for n in present)
        firsts = [n["first_in_s"] for n in present if n["first_in_s"] is not None]
        lasts = [n["last_in_s"] for n in present if n["last_in_s"] is not None]
        span = (max(lasts) - min(firsts)) if firsts else 0.0
        p50s = [n["latency_p50_s"] for n in present if n["latency_p50_s"] is not None]
        p99s = [n["latency_p99_s"] for n in present if n["latency_p99_s"] is not None]
        workers = [n["worker"] for n in present]
        stages.append(
            {
                "stage": stage.name,
                "role": stage.role,
                "count": stage.count,
                "events_in": n_in,
                "accepted": accepted,
                "rejected": rejected,
                "dropped": dict(dropped),
                "events_out": dict(events_out),
                "records_out": sum(sum(n["records_out"].values()) for n in present),
                "records_lost": sum(sum(n["records_lost"].values()) for n in present),
                "records_resent": sum(sum(n["records_resent"].values()) for n in present),
                "records_unconfirmed": sum(n["records_unconfirmed"] for n in present),
                "records_in": sum(n["records_in"] for n in present),
                "accept_fraction": accepted / n_in if n_in else None,
                "paths": _sum_paths(workers),
                "rate_hz": n_in / span if span > 0 else 0.0,
                "latency_p50_s": float(np.median(p50s)) if p50s else None,
                "latency_p99_s": max(p99s) if p99s else None,
                "balanced": bool(nodes) and all(n["balanced"] for n in nodes),
                "curve_refused": sum(n["curve_refused"] for n in present),
                "lost": [{"node": n["name"], **loss} for n in nodes for loss in n.get("lost", [])],
                "nodes": nodes,
            }
        )
    _estimate_node_losses(stages)
    source_workers = [n["worker"] for n in stages[0]["nodes"] if not n.get("missing")]
    norm = rate_normalisation(source_workers[0] if source_workers else {}, stages[0]["accepted"])
    _add_rates(stages, norm)
    links = []
    for up, down in itertools.pairwise(stages):
        port = ROLES[up["role"]].output_port or ""
        sent = up["events_out"].get(port, 0)
        links.append(
            {
                "from": up["stage"],
                "to": down["stage"],
                "sent": sent,
                "received": down["events_in"],
                "records_sent": up["records_out"],
                "records_received": down["records_in"],
                "records_lost_in_flight": down.get("records_lost_in_flight", 0),
                "balanced": sent == down["events_in"]
                and up["records_out"] == down["records_in"] + down.get("records_lost_in_flight", 0),
            }
        )
    archive_bytes = {}
    for stage in plan.topology.stages:
        role = ROLES[stage.role]
        for p in plan.stage_nodes(stage.name):
            target = role.output_path(stage.config, p.launch)
            if target:
                archive_bytes[p.node.name] = _dir_bytes(Path(target))
    balanced = all(s["balanced"] for s in stages) and all(link["balanced"] for link in links)
    source = stages[0]
    return {
        "farm": plan.topology.farm.name,
        "trigfarm_version": version(),
        "topology": plan.topology.path,
        "out_dir": plan.out_dir,
        "wall_s": result.wall_s,
        "interrupted": result.interrupted,
        "exitcodes": result.exitcodes,
        "lost_nodes": {
            name: [{k: v for k, v in loss.items() if k != "stats"} for loss in losses]
            for name, losses in result.losses.items()
        },
        "degraded_stages": [s["stage"] for s in stages if s["lost"]],
        "events_generated": source["accepted"],
        "events_final": stages[-1]["accepted"],
        "rates": norm,
        "signal_efficiencies": signal_efficiencies(stages, source_workers),
        "archive_bytes": archive_bytes,
        "accounting": {
            "balanced": balanced,
            "rule": "every node and stage: in = accepted + rejected + sum(dropped); "
            "every link: events and records sent = received",
            "stages": {s["stage"]: s["balanced"] for s in stages},
            "links": {f"{link['from']}->{link['to']}": link["balanced"] for link in links},
        },
        "stages": stages,
        "links": links,
    }


def _efficiency(k: int, n: int) -> list[float]:
    """[k / n, low, high]: the Clopper-Pearson 68.3% interval, which stays inside [0, 1]
    and does not shrink to nothing at 0 or n of n events."""
    interval = stats.binomtest(k, n).proportion_ci(confidence_level=CONFIDENCE_LEVEL)
    return [k / n, float(interval.low), float(interval.high)]


def signal_efficiencies(
    stages: Sequence[Mapping[str, Any]], source_workers: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Per signal process, each trigger stage's ``seen`` events and, for ``accepted`` and
    every path, [efficiency, low, high] of the events the stage saw (``of_seen``) and of the
    events the first trigger stage saw (``of_produced``)."""
    names: dict[str, str] = {}
    for worker in source_workers:
        names.update(worker.get("process_names") or {})
    per_stage: list[tuple[str, dict[str, Counter[str]]]] = []
    for stage in stages:
        total: dict[str, Counter[str]] = {}
        for node in stage["nodes"]:
            for pid, counts in (node.get("worker") or {}).get("signal_paths", {}).items():
                total.setdefault(pid, Counter()).update(counts)
        if total:
            per_stage.append((stage["stage"], total))
    out = []
    for pid in sorted({pid for _, total in per_stage for pid in total}, key=int):
        produced = next((t[pid][SEEN] for _, t in per_stage if t.get(pid)), 0)
        rows = []
        for name, total in per_stage:
            counts = total.get(pid, Counter())
            seen = counts[SEEN]
            paths = {k: v for k, v in counts.items() if k != SEEN}
            rows.append(
                {
                    "stage": name,
                    "seen": seen,
                    "of_seen": {k: _efficiency(v, seen) for k, v in paths.items()} if seen else {},
                    "of_produced": (
                        {k: _efficiency(v, produced) for k, v in paths.items()} if produced else {}
                    ),
                }
            )
        out.append(
            {"process_id": int(pid), "name": names.get(pid, f"process {pid}"), "stages": rows}
        )
    return out


def format_signal_efficiencies(report: Mapping[str, Any]) -> list[str]:
    """One block per signal process: each stage's acceptance and path efficiencies."""
    lines = []
    for signal in report.get("signal_efficiencies") or []:
        first = signal["stages"][0]["seen"] if signal["stages"] else 0
        lines.append(f"signal {signal['name']} (process {signal['process_id']}): {first} events")
        for row in signal["stages"]:
            if not row["seen"]:
                lines.append(f"{'':<4}{row['stage']:<8}none reached it")
                continue
            of_seen, of_produced = row["of_seen"], row["of_produced"]
            e, low, high = of_seen.get("accepted", [0.0, 0.0, 0.0])
            paths = ", ".join(
                f"{k} {v[0]:.1%}" for k, v in sorted(of_seen.items()) if k != "accepted"
            )
            overall = of_produced.get("accepted")
            share = (
                f" ({overall[0]:.1%} of all)"
                if overall is not None and row["seen"] != first
                else ""
            )
            lines.append(
                f"{'':<4}{row['stage']:<8}accepted {e:.1%} (+{high - e:.1%} -{e - low:.1%}) "
                f"of {row['seen']}{share}; paths: {paths}"
            )
    if lines:
        lines.insert(
            0, "signal efficiencies (share of each signal's events; Clopper-Pearson 68% intervals):"
        )
    return lines


def write_report(report: Mapping[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``dashboard.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "report.json"
    json_path.write_text(json.dumps(report, indent=2, default=float))
    png_path = out / "dashboard.png"
    plot_dashboard(report, png_path)
    return json_path, png_path


def plot_dashboard(report: Mapping[str, Any], path: Path) -> None:
    """Four panels: rate, batch latency, accept fractions, and the accounting per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = report["stages"]
    names = [s["stage"] for s in stages]
    x = np.arange(len(names))
    fig, axes = plt.subplots(3, 2, figsize=(11, 10.5))
    ax = axes[0, 0]
    ax.bar(x, [s["rate_hz"] for s in stages], color="tab:blue")
    ax.set_title("input rate per stage")
    ax.set_ylabel("events / s")
    ax = axes[0, 1]
    p50 = [1e3 * (s["latency_p50_s"] or 0) for s in stages]
    p99 = [1e3 * (s["latency_p99_s"] or 0) for s in stages]
    ax.bar(x - 0.2, p50, 0.4, label="p50")
    ax.bar(x + 0.2, p99, 0.4, label="p99")
    ax.set_title("batch latency per stage")
    ax.set_ylabel("ms")
    if any(v > 0 for v in p99):
        ax.set_yscale("log")
    ax.legend()
    ax = axes[1, 0]
    labels, fractions = [], []
    for s in stages:
        if s["accept_fraction"] is not None:
            labels.append(s["stage"])
            fractions.append(s["accept_fraction"])
        for trigger_path, count in s["paths"].items():
            labels.append(f"{s['stage']}:{trigger_path}")
            fractions.append(count / s["events_in"] if s["events_in"] else 0)
    ax.barh(np.arange(len(labels)), fractions, color="tab:green")
    ax.set_yticks(np.arange(len(labels)), labels)
    ax.set_xlim(0, 1.05)
    ax.set_title("accept fraction per stage and trigger path")
    ax = axes[1, 1]
    accepted = np.array([s["accepted"] for s in stages], float)
    rejected = np.array([s["rejected"] for s in stages], float)
    dropped = np.array([sum(s["dropped"].values()) for s in stages], float)
    ax.bar(x, accepted, label="accepted")
    ax.bar(x, rejected, bottom=accepted, label="rejected")
    ax.bar(x, dropped, bottom=accepted + rejected, label="dropped", color="tab:red")
    ax.scatter(x, [s["events_in"] for s in stages], color="k", marker="_", s=400, label="in")
    verdict = "balanced" if report["accounting"]["balanced"] else "NOT balanced"
    total_bytes = sum(report["archive_bytes"].values())
    ax.set_title(f"accounting: {verdict}; archive {total_bytes / 1e6:.2f} MB")
    ax.legend(fontsize=8)
    for ax in (axes[0, 0], axes[0, 1], axes[1, 1]):
        ax.set_xticks(x, names)
    _plot_rate_table(axes[2, 0], report)
    _plot_lumi_rates(axes[2, 1], report)
    fig.suptitle(f"trigfarm run {report['farm']}: {report['wall_s']:.1f} s wall")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_rate_table(ax: Any, report: Mapping[str, Any]) -> None:
    """The rate table (Hz with errors, reduction per stage) as a figure panel."""
    ax.axis("off")
    rows = []
    for s in report["stages"]:
        rate_out = s.get("rate_out")
        if rate_out is None or s["role"] == "archive":
            continue
        cut = s.get("reduction")
        text = f"{cut['reduction']:.3g} +- {cut['error']:.2g}" if cut else "-"
        rows.append([s["stage"], _hz(s["rate_in"]), _hz(rate_out), text])
    if not rows:
        ax.set_title("rates: none reported")
        return
    table = ax.table(
        cellText=rows,
        colLabels=["stage", "rate in", "rate out", "reduction"],
        colWidths=[0.14, 0.32, 0.32, 0.22],
        cellLoc="center",
        loc="center",
    )
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.4)
    norm = report.get("rates") or {}
    mu = (norm.get("pileup") or {}).get("mu_mean")
    where = f", mu {mu:.3g}" if mu is not None else ""
    ax.set_title(f"rates ({norm.get('weighting', '?')} weights{where})")


def _plot_lumi_rates(ax: Any, report: Mapping[str, Any]) -> None:
    """Each trigger stage's output rate per lumi block, with its error."""
    plotted = False
    for s in report["stages"]:
        for path, label in (("all", f"{s['stage']} in"), ("accepted", f"{s['stage']} out")):
            rows = (s.get("lumi_rates") or {}).get(path)
            if not rows or (path == "all" and s is not report["stages"][1]):
                continue
            lumi, rate, error = np.asarray(rows).T
            ax.errorbar(lumi, rate, yerr=error, marker="o", ms=3, capsize=2, label=label)
            plotted = True
    if plotted:
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel("lumi block")
    ax.set_ylabel("rate [Hz]")
    ax.set_title("rate per lumi block")


def format_report(report: Mapping[str, Any]) -> str:
    """A plain-text summary for the terminal."""
    lines = [
        f"farm {report['farm']}: {report['events_generated']} events in {report['wall_s']:.1f} s"
        + (" (interrupted)" if report["interrupted"] else ""),
        f"{'stage':<10}{'nodes':>6}{'in':>10}{'accepted':>10}{'rejected':>10}{'dropped':>9}"
        f"{'accept':>8}{'rate/s':>10}{'p50 ms':>9}{'p99 ms':>9}  books",
    ]
    for s in report["stages"]:
        frac = f"{s['accept_fraction']:.3f}" if s["accept_fraction"] is not None else "-"
        p50 = f"{1e3 * s['latency_p50_s']:.2f}" if s["latency_p50_s"] is not None else "-"
        p99 = f"{1e3 * s['latency_p99_s']:.2f}" if s["latency_p99_s"] is not None else "-"
        lines.append(
            f"{s['stage']:<10}{s['count']:>6}{s['events_in']:>10}{s['accepted']:>10}"
            f"{s['rejected']:>10}{sum(s['dropped'].values()):>9}{frac:>8}{s['rate_hz']:>10.0f}"
            f"{p50:>9}{p99:>9}  {'ok' if s['balanced'] else 'UNBALANCED'}"
        )
        if s["dropped"]:
            lines.append(f"{'':<10}dropped by reason: {s['dropped']}")
        if s["paths"]:
            fired = ", ".join(f"{k} {v}" for k, v in s["paths"].items())
            lines.append(f"{'':<10}trigger paths (events firing): {fired}")
        if s["records_out"] or s["records_in"] or s.get("records_lost"):
            lost = f", {s['records_lost']} LOST (undeliverable)" if s.get("records_lost") else ""
            if s.get("records_resent"):
                lost += f", {s['records_resent']} of them resent (no receipt from the store)"
            if s.get("records_unconfirmed"):
                lost += f", {s['records_unconfirmed']} UNCONFIRMED (no receipt at the stop)"
            lines.append(
                f"{'':<10}records (flow snapshots): {s['records_out']} out, "
                f"{s['records_in']} in{lost}"
            )
    for link in report["links"]:
        if not link["balanced"]:
            lines.append(
                f"link {link['from']}->{link['to']}: sent {link['sent']} events and "
                f"{link['records_sent']} records, received {link['received']} and "
                f"{link['records_received']}: UNBALANCED"
            )
    for s in report["stages"]:
        for loss in s.get("lost", []):
            at = f" at {loss['at_s']:.1f} s" if loss.get("at_s") is not None else ""
            then = "restarted" if loss["restarted"] else "taken out"
            lines.append(f"node {loss['node']} LOST{at} ({loss['reason']}); {then}")
        if s.get("lost"):
            lines.append(
                f"stage {s['stage']} DEGRADED: {s['dropped'].get('node_lost', 0)} events lost "
                f"with its node(s), {s.get('records_lost_in_flight', 0)} records in flight "
                "(estimated from the last heartbeats and the links)"
            )
    lines.extend(format_rates(report))
    lines.extend(format_signal_efficiencies(report))
    archived = sum(report["archive_bytes"].values())
    lines.append(f"archive: {archived:,} bytes")
    verdict = "balanced" if report["accounting"]["balanced"] else "NOT balanced"
    lines.append(f"accounting (in = accepted + rejected + dropped, sent = received): {verdict}")
    return "\n".join(lines)


def _hz(rate: Mapping[str, float]) -> str:
    if "upper_hz" in rate:
        return f"0 Hz (< {_si(rate['upper_hz'])}, 68% CL)"
    return f"{_si(rate['rate_hz'])} +- {_si(rate['error_hz'])}"


def _si(value_hz: float) -> str:
    for scale, unit in ((1e9, "GHz"), (1e6, "MHz"), (1e3, "kHz")):
        if abs(value_hz) >= scale:
            return f"{value_hz / scale:.3g} {unit}"
    return f"{value_hz:.3g} Hz"


def format_rates(report: Mapping[str, Any]) -> list[str]:
    """The rate table: each stage's input and output and each path's rate with its error."""
    norm = report.get("rates")
    if not norm:
        return []
    pileup = norm.get("pileup") or {}
    if norm["weighting"] == "cross_section":
        basis = f"at L = {norm['luminosity_cm2s']:.3g} cm^-2 s^-1 (cross-section weights)"
    elif norm["weighting"] == "crossing":
        mu = pileup.get("mu_mean")
        basis = (
            f"at {_si(norm['crossing_rate_hz'])} of weighted bunch crossings, pileup mu {mu:.3g}"
            if mu is not None
            else "at weighted bunch crossings"
        )
    else:
        basis = f"at {_si(norm['crossing_rate_hz'])} of crossings (one event per crossing)"
    lines = [
        f"rates {basis}, from {norm['source_events']} source events:",
        f"{'stage':<10}{'in':>28}{'out':>28}  reduction",
    ]
    for s in report["stages"]:
        rate_in, rate_out = s.get("rate_in"), s.get("rate_out")
        if rate_in is None or rate_out is None:
            continue
        cut = s.get("reduction")
        if cut:
            text = f"{cut['reduction']:.3g} +- {cut['error']:.2g}"
        elif rate_out["rate_hz"] > 0:
            text = f"{rate_in['rate_hz'] / rate_out['rate_hz']:.3g}"
        else:
            text = "-"
        lines.append(f"{s['stage']:<10}{_hz(rate_in):>28}{_hz(rate_out):>28}  {text}")
        for path, rate in s.get("path_rates", {}).items():
            lines.append(f"{'':<10}{'path ' + path:>28}{_hz(rate):>28}")
    return lines
