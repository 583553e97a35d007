"""Simulator speed per process, replay speed, and our QCD dijets against real LHCO background.

1. Generation: for each process in ``PROCESSES``, one ``EventGenerator`` in this process
   (one core) makes ``--events`` events in one block after Pythia's initialisation; events
   per second exclude the initialisation, which is reported apart.
2. Replay: events per second reading back a cache file written by ``simulate_to_file``
   (every column), the LHCO features files and the LHCO raw file (clustered on the fly).
3. Validation: ``--validation-events`` QCD dijet events (recipe ``qcd``, pT-hat > 1 TeV)
   and the LHCO R&D background in ``lhco-rnd-100k``, both after the same selection (a fat
   jet with pT > 1.2 TeV): medians of mJ1, tau21(J1) and mjj, and the two-sample
   Kolmogorov-Smirnov distance of each; an overlay plot is written to ``--out-dir``.

    python -m benchmarks.simulator [--events 100] [--validation-events 3000] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from scipy.stats import ks_2samp

from simulator import PROCESSES, EventGenerator
from simulator.cache import read_cache
from simulator.production import simulate_to_file
from simulator.replay import replay
from stream.batch import EventBatch
from stream.schema import FEATURE_NAMES

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
FAT_JET_PT_MIN_GEV = 1200.0
OBSERVABLES = {"mj1": "m_J1 [GeV]", "tau21_j1": "tau21(J1)", "mjj": "m_jj [GeV]"}
RANGES = {"mj1": (0, 1000), "tau21_j1": (0, 1.2), "mjj": (1500, 6000)}
COL = {name: i for i, name in enumerate(FEATURE_NAMES)}


def generation_rates(names: list[str], n_events: int, seed: int) -> dict[str, dict[str, float]]:
    """Events per second (one core) and initialisation time for each process."""
    out: dict[str, dict[str, float]] = {}
    for name in names:
        t0 = time.perf_counter()
        generator = EventGenerator(name, seed=seed)
        init_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        batch = generator.block(0, n_events)
        elapsed = time.perf_counter() - t1
        stats = generator.stats
        out[name] = {
            "events": len(batch),
            "events_per_s": len(batch) / elapsed,
            "init_s": init_s,
            "filter_efficiency": stats.filter_efficiency,
        }
        print(
            f"  {name:10s} {len(batch) / elapsed:8.1f} ev/s   init {init_s:5.2f} s   "
            f"kept/passed {stats.filter_efficiency:.3f}"
        )
    return out


def replay_rate(kind: str, paths: list[Path], chunk_size: int, repeats: int = 3) -> float:
    """Best of ``repeats`` full passes, in events per second."""
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = sum(len(b) for b in replay(kind, paths, chunk_size=chunk_size))
        best = max(best, n / (time.perf_counter() - t0))
    return best


def selected(batches: list[EventBatch]) -> np.ndarray:
    """Features of the events with a fat jet above the pT threshold."""
    batch = EventBatch.concat(batches)
    keep = batch["fatjets"][:, :, 0].max(axis=1) > FAT_JET_PT_MIN_GEV
    return batch["features"][keep]


def tau21_definition_check(raw: list[Path], bkg01: Path) -> dict[str, float]:
    """Our N-subjettiness against the LHCO features' on the very same events: the raw
    file's background events, clustered here, against the first rows of ``bkg01``."""
    ours = EventBatch.concat(list(replay("lhco-raw", raw)))
    background = ours.truth["is_signal"] == 0
    mine = ours["features"][background, COL["tau21_j1"]]
    theirs = EventBatch.concat(list(replay("lhco-features", [bkg01], chunk_size=len(mine))))
    theirs_tau = theirs["features"][: len(mine), COL["tau21_j1"]]
    diff = mine - theirs_tau
    return {
        "events": len(mine),
        "median_ours": float(np.median(mine)),
        "median_lhco": float(np.median(theirs_tau)),
        "median_difference": float(np.median(diff)),
        "fraction_within_0p05": float(np.mean(np.abs(diff) < 0.05)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100, help="events per process (speed)")
    parser.add_argument("--validation-events", type=int, default=3000)
    parser.add_argument("--processes", nargs="*", default=sorted(PROCESSES))
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "out" / "benchmarks")
    parser.add_argument("--lhco-dir", type=Path, default=SHARED / "lhco-rnd-100k")
    parser.add_argument("--lhco-raw", type=Path, default=SHARED / "lhco-rnd-raw-1k")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)

    print(f"generation, one core, {args.events} events per process:")
    gen = generation_rates(args.processes, args.events, args.seed)

    print(f"QCD validation sample: {args.validation_events} events (1 worker) ...")
    cache = args.out_dir / "qcd_validation.h5"
    production = simulate_to_file(
        "qcd", args.validation_events, cache, seed=args.seed, overwrite=True, progress=False
    )
    print(
        f"  {production.n_events} events in {production.elapsed_s:.0f} s "
        f"({production.events_per_s:.1f} ev/s)"
    )

    lhco_bkg = sorted(args.lhco_dir.glob("scalars_bkg*.h5"))
    raw = sorted(args.lhco_raw.glob("*.h5"))
    rates = {
        "cache": replay_rate("cache", [cache], 1024),
        "lhco-features": replay_rate("lhco-features", lhco_bkg, 4096),
        "lhco-raw": replay_rate("lhco-raw", raw, 256, repeats=1),
    }
    for kind, rate in rates.items():
        print(f"replay {kind:14s} {rate:12,.0f} ev/s")
    tau_check = tau21_definition_check(raw, lhco_bkg[0])
    print(
        f"tau21(J1) on the same {tau_check['events']} LHCO raw background events: ours "
        f"{tau_check['median_ours']:.3f} vs LHCO features {tau_check['median_lhco']:.3f} "
        f"(median difference {tau_check['median_difference']:+.4f}, "
        f"{tau_check['fraction_within_0p05']:.1%} within 0.05)"
    )

    ours = selected(list(read_cache([cache], chunk_size=4096, columns=["fatjets", "features"])))
    real = selected(list(replay("lhco-features", lhco_bkg)))
    print(
        f"selection: fat jet pT > {FAT_JET_PT_MIN_GEV:g} GeV: ours {len(ours)} of "
        f"{production.n_events}, LHCO background {len(real)}"
    )
    table: dict[str, dict[str, float]] = {}
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    print(f"{'observable':10s} {'median ours':>12s} {'median LHCO':>12s} {'KS D':>8s} {'p':>9s}")
    for ax, (name, label) in zip(axes, OBSERVABLES.items(), strict=True):
        a, b = ours[:, COL[name]], real[:, COL[name]]
        test = ks_2samp(a, b)
        table[name] = {
            "median_ours": float(np.median(a)),
            "median_lhco": float(np.median(b)),
            "ks_distance": float(test.statistic),
            "ks_pvalue": float(test.pvalue),
        }
        row = table[name]
        print(
            f"{name:10s} {row['median_ours']:12.3f} {row['median_lhco']:12.3f} "
            f"{row['ks_distance']:8.3f} {row['ks_pvalue']:9.2g}"
        )
        bins = np.linspace(*RANGES[name], 41)
        ax.hist(b, bins, density=True, histtype="step", lw=1.5, label=f"LHCO R&D bkg ({len(b)})")
        ax.hist(a, bins, density=True, histtype="step", lw=1.5, label=f"trigfarm qcd ({len(a)})")
        ax.set_xlabel(label)
        ax.set_title(f"KS D = {row['ks_distance']:.3f}")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"QCD dijets, fat jet pT > {FAT_JET_PT_MIN_GEV:g} GeV: trigfarm vs LHCO R&D")
    fig.tight_layout()
    plot = args.out_dir / "simulator_validation.png"
    fig.savefig(plot, dpi=100)
    print(f"plot: {plot}")

    result = {
        "benchmark": "simulator",
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "generation": gen,
        "replay_events_per_s": rates,
        "validation": {
            "generated": production.n_events,
            "selected_ours": len(ours),
            "selected_lhco": len(real),
            "fat_jet_pt_min_gev": FAT_JET_PT_MIN_GEV,
            "observables": table,
            "tau21_same_events": tau_check,
        },
        "plot": str(plot),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
