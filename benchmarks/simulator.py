"""Simulator speed against bare Pythia, the pT-hat turn-on, and fidelity to LHCO R&D.

1. Speed, side by side in one run (same Pythia settings: HardQCD, pT-hat > 1 TeV, no
   MPI). Bare Pythia is ``next()`` only, in this process. ``trigfarm simulate`` is timed
   through the functions the command calls: the ``lhco-like`` background
   (``produce_dataset``: detector, clustering, N-subjettiness, the 1.2 TeV selection,
   chunk writing and checksums) with 1 and 2 workers, its signal, and ``--process qcd``
   with every column (``simulate_to_file``). Pythia's initialisation is included in
   ``trigfarm simulate``'s time. Per-core rates use CPU time (this machine is shared, so
   wall time per core depends on the neighbours); rates with 2 workers use wall time.
   ``ratio_vs_bare_pythia`` = Pythia events processed per CPU-second by the
   ``lhco-like`` background production / bare Pythia's events per CPU-second.
   Every process's rate with every column and the replay readers' rates follow at the end.
2. Turn-on: QCD in pT-hat windows below 1 TeV, each event through the detector and the
   selection; weighted by Pythia's cross sections, the share of selected events that a
   pT-hat cut would lose, and the cost (Pythia events per selected event) of each cut.
3. Fidelity: ``--validation-events`` selected ``lhco-like`` background events against
   the LHCO R&D background ``scalars_bkg01``-``08`` (bkg09-10 are left alone), KS
   distance per feature. tau_N are computed as the LHCO features files computed them
   (``JetConfig(tau_convention="lhco-features")``, checked event by event on the raw
   LHCO events), so that the comparison is like for like; the shipped default (FastJet
   contrib's definition) is compared too. Overlay plots go to ``--out-dir``. A sample
   with pT-hat > 900 GeV checks whether LHCO's own sample lacks the turn-on too.
   ``--detector-scan N`` first runs the same N Pythia events through each tuning step
   of the detector (``--only-scan``: nothing else).

    python -m benchmarks.simulator [--bare-events 2000] [--events 2000]
        [--validation-events 6000] [--out-dir out/benchmarks]

The last line printed is a JSON object with ``ratio_vs_bare_pythia``, ``ks_tau21_j1``,
``ks_tau21_j2``, ``ks_mj1``, ``ks_delta_mj`` and ``ks_mjj``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from scipy.stats import ks_2samp

from simulator import (
    PROCESSES,
    DetectorModel,
    EventGenerator,
    JetConfig,
    generate,
    make_pythia,
    make_recipe,
)
from simulator.dataset import (
    LHCO_FATJET_PT_MIN_GEV,
    DatasetRecipe,
    dataset_files,
    lhco_like,
    produce_dataset,
)
from simulator.production import simulate_to_file
from simulator.recipes import EventFilter
from simulator.replay import replay
from stream.batch import EventBatch
from stream.eventfile import read_cache
from stream.schema import FEATURE_NAMES

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
COL = {name: i for i, name in enumerate(FEATURE_NAMES)}
OBSERVABLES = {
    "mj1": ("m_J1 [GeV]", (0, 1000)),
    "delta_mj": ("m_J2 - m_J1 [GeV]", (-800, 0)),
    "mjj": ("m_jj [GeV]", (2000, 6000)),
    "tau21_j1": ("tau21(J1)", (0, 1.2)),
    "tau21_j2": ("tau21(J2)", (0, 1.2)),
    "tau32_j1": ("tau32(J1)", (0, 1.2)),
}
PTHAT_WINDOWS = ((700.0, 800.0), (800.0, 900.0), (900.0, 1000.0), (1000.0, -1.0))


def generation_rates(n_events: int, seed: int) -> dict[str, dict[str, float]]:
    """Every process, every column, one core: events per CPU-second after initialisation."""
    out: dict[str, dict[str, float]] = {}
    for name in sorted(PROCESSES):
        t0 = time.process_time()
        generator = EventGenerator(name, seed=seed)
        init_s = time.process_time() - t0
        t1 = time.process_time()
        batch = generator.block(0, n_events)
        rate = len(batch) / (time.process_time() - t1)
        out[name] = {
            "events_per_s": rate,
            "init_s": init_s,
            "filter_efficiency": generator.stats.filter_efficiency,
        }
        print(f"  {name:10s} {rate:8.1f} ev/CPU-s   init {init_s:5.2f} s")
    return out


def replay_rates(lhco_dir: Path, raw_dir: Path, seed: int) -> dict[str, float]:
    """Events per second reading a cache file, the LHCO features and the raw LHCO events."""
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "q.h5"
        simulate_to_file("qcd", 2000, cache, seed=seed, progress=False)
        sources = {
            "cache": ([cache], 1024),
            "lhco-features": (sorted(lhco_dir.glob("scalars_bkg*.h5")), 4096),
            "lhco-raw": (sorted(raw_dir.glob("*.h5")), 256),
        }
        rates = {}
        for kind, (paths, chunk) in sources.items():
            t0 = time.perf_counter()
            n = sum(len(b) for b in replay(kind, paths, chunk_size=chunk))
            rates[kind] = n / (time.perf_counter() - t0)
            print(f"  replay {kind:14s} {rates[kind]:12,.0f} ev/s")
    return rates


def component(recipe: DatasetRecipe, name: str, n_events: int) -> DatasetRecipe:
    """``recipe`` reduced to one of its components with ``n_events``."""
    (part,) = [c for c in recipe.components if c.name == name]
    part = dataclasses.replace(part, n_events=n_events)
    return dataclasses.replace(recipe, components=(part,))


def bare_pythia(n_events: int, seed: int) -> dict[str, float]:
    """``next()`` only, with the ``qcd`` recipe's settings; rates exclude initialisation."""
    pythia = make_pythia(make_recipe("qcd"), seed)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(n_events):
        pythia.next()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"events": n_events, "cpu_per_s": n_events / cpu, "wall_per_s": n_events / wall}


def produce(
    recipe: DatasetRecipe, workers: int, seed: int, jets: JetConfig | None = None
) -> tuple[dict[str, float], Path]:
    """Run ``produce_dataset`` into a temporary folder; rates of Pythia and of kept events."""
    out = Path(tempfile.mkdtemp(prefix="trigfarm-bench-"))
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    children_cpu = children.ru_utime + children.ru_stime
    cpu, wall = time.process_time(), time.perf_counter()
    result = produce_dataset(
        recipe,
        out,
        seed=seed,
        workers=workers,
        block_size=250,
        chunk_events=1000,
        jets=jets,
        progress=False,
    )
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    # Workers are joined when their pool closes, so their CPU time is counted here.
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu += children.ru_utime + children.ru_stime - children_cpu
    tried, kept = result.stats.tried, result.made_events
    rates = {
        "workers": workers,
        "kept": kept,
        "tried": tried,
        "wall_s": wall,
        "kept_per_s_wall": kept / wall,
        "tried_per_s_wall": tried / wall,
    }
    rates |= {"cpu_s": cpu, "kept_per_s_cpu": kept / cpu, "tried_per_s_cpu": tried / cpu}
    return rates, out


def full_layout_qcd(n_events: int, seed: int) -> dict[str, float]:
    """``trigfarm simulate --process qcd`` (every column), one worker, CPU time."""
    with tempfile.TemporaryDirectory() as tmp:
        cpu, wall = time.process_time(), time.perf_counter()
        simulate_to_file("qcd", n_events, Path(tmp) / "q.h5", seed=seed, progress=False)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"events": n_events, "cpu_per_s": n_events / cpu, "wall_per_s": n_events / wall}


def turn_on(n_per_window: int, seed: int) -> dict[str, Any]:
    """Selection efficiency and cross section per pT-hat window; what each cut loses."""
    windows = []
    for lo, hi in PTHAT_WINDOWS:
        recipe = make_recipe(
            "qcd",
            pthat_min_gev=lo,
            pthat_max_gev=hi,
            event_filter=EventFilter(fatjet_pt_gev=LHCO_FATJET_PT_MIN_GEV),
        )
        generator = EventGenerator(recipe, seed=seed, layout="features")
        # A filtered block keeps asking until it has its events: ask for one at a time
        # and count every Pythia event tried (the efficiency counts all kept events).
        index = 0
        while generator.stats.tried < n_per_window:
            generator.block(index, 1)
            index += 1
        stats = generator.stats
        passed = stats.tried - stats.aborted
        windows.append(
            {
                "pthat_gev": [lo, hi],
                "tried": stats.tried,
                "kept": stats.kept,
                "efficiency": stats.kept / passed,
                "sigma_pb": generator.cross_section_mb * 1e9,
            }
        )
    selected = np.array([w["sigma_pb"] * w["efficiency"] for w in windows])
    sigma = np.array([w["sigma_pb"] for w in windows])
    cuts = {}
    for k, (lo, _) in enumerate(PTHAT_WINDOWS):
        lost = selected[:k].sum() / selected.sum()
        cost = sigma[k:].sum() / selected[k:].sum()  # Pythia events per selected event
        cuts[f"{lo:g}"] = {"selected_lost": float(lost), "pythia_events_per_selected": float(cost)}
    return {"windows": windows, "cuts": cuts}


def detector_variants() -> dict[str, DetectorModel]:
    """The tuning steps of ``simulator/detector.py``, from the old model to the options."""
    shipped = DetectorModel()

    def cells(model: DetectorModel, position: str) -> DetectorModel:
        return dataclasses.replace(
            model,
            ecal=dataclasses.replace(model.ecal, position=position),
            hcal=dataclasses.replace(model.hcal, position=position),
            forward=dataclasses.replace(model.forward, position=position),
        )

    flow = dataclasses.replace(
        shipped,
        particle_flow=True,
        hcal=dataclasses.replace(shipped.hcal, significance_min=1.0),
    )
    return {
        "before: centroid cells, all tracks found": cells(
            dataclasses.replace(shipped, track_efficiency=1.0), "centroid"
        ),
        "cells anywhere inside (uniform)": dataclasses.replace(shipped, track_efficiency=1.0),
        "+ 95% tracking efficiency (shipped)": shipped,
        "+ particle flow (excess > 1 sigma)": flow,
        "+ particle flow, HCAL 150%/sqrt(E)": dataclasses.replace(
            flow, hcal=dataclasses.replace(flow.hcal, stochastic=1.5)
        ),
    }


def detector_scan(n_events: int, seed: int, real: np.ndarray) -> dict[str, dict[str, float]]:
    """The same Pythia events (no filter, so every variant sees all of them) through each
    detector variant, then the selection; KS distances to LHCO, LHCO tau convention."""
    jets = JetConfig(tau_convention="lhco-features")
    out = {}
    for name, detector in detector_variants().items():
        batches = list(
            generate("qcd", n_events, seed=seed, batch_size=500, detector=detector, jets=jets,
                     layout="features")
        )  # fmt: skip
        batch = EventBatch.concat(batches)
        selected = batch["features"][batch["fatjets"][:, :, 0].max(axis=1) > LHCO_FATJET_PT_MIN_GEV]
        table = compare(selected, real)
        out[name] = {k: table[k]["ks_distance"] for k in ("tau21_j1", "tau21_j2", "mj1", "mjj")}
        out[name]["selected"] = len(selected)
        row = out[name]
        print(
            f"  {name:42s} tau21 J1 {row['tau21_j1']:.3f}  J2 {row['tau21_j2']:.3f}  "
            f"mJ1 {row['mj1']:.3f}  mjj {row['mjj']:.3f}  ({len(selected)} selected)"
        )
    return out


def features_of(path: Path, name: str) -> np.ndarray:
    batches = list(read_cache(dataset_files(path, name), columns=["features"]))
    return EventBatch.concat(batches)["features"]


def compare(ours: np.ndarray, real: np.ndarray) -> dict[str, dict[str, float]]:
    table = {}
    for name in OBSERVABLES:
        a, b = ours[:, COL[name]], real[:, COL[name]]
        test = ks_2samp(a, b)
        table[name] = {
            "median_ours": float(np.median(a)),
            "median_lhco": float(np.median(b)),
            "ks_distance": float(test.statistic),
            "ks_pvalue": float(test.pvalue),
        }
    return table


def overlay(ours: np.ndarray, default: np.ndarray, real: np.ndarray, path: Path) -> None:
    fig, axes = plt.subplots(2, 3, figsize=(14, 8))
    for ax, (name, (label, span)) in zip(axes.flat, OBSERVABLES.items(), strict=True):
        bins = np.linspace(*span, 41)
        b, a = real[:, COL[name]], ours[:, COL[name]]
        ax.hist(b, bins, density=True, histtype="step", lw=1.5, label=f"LHCO R&D bkg ({len(b)})")
        ax.hist(
            a, bins, density=True, histtype="step", lw=1.5, label=f"trigfarm lhco-like ({len(a)})"
        )
        if name.startswith("tau"):
            ax.hist(
                default[:, COL[name]],
                bins,
                density=True,
                histtype="step",
                lw=1,
                ls="--",
                label="trigfarm, FastJet tau definition",
            )
        ax.set_xlabel(label)
        ax.set_title(f"KS D = {ks_2samp(a, b).statistic:.3f}")
        ax.legend(fontsize=7)
    fig.suptitle(
        f"QCD dijets after the LHCO selection (fat jet pT > {LHCO_FATJET_PT_MIN_GEV:g} GeV): "
        "trigfarm vs LHCO R&D bkg01-08 (tau in the LHCO files' convention)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bare-events", type=int, default=2000)
    parser.add_argument("--events", type=int, default=2000, help="selected events (speed)")
    parser.add_argument("--signal-events", type=int, default=500)
    parser.add_argument("--validation-events", type=int, default=6000)
    parser.add_argument("--turn-on-events", type=int, default=3000, help="per pT-hat window")
    parser.add_argument("--pthat-check-events", type=int, default=2000)
    parser.add_argument("--process-events", type=int, default=100, help="0: skip")
    parser.add_argument(
        "--detector-scan", type=int, default=0, help="Pythia events per detector variant"
    )
    parser.add_argument("--only-scan", action="store_true", help="run the detector scan only")
    parser.add_argument("--lhco-raw", type=Path, default=SHARED / "lhco-rnd-raw-1k")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "out" / "benchmarks")
    parser.add_argument("--lhco-dir", type=Path, default=SHARED / "lhco-rnd-100k")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    lhco = lhco_like()
    load_before = os.getloadavg()[0]
    if args.detector_scan:
        files = [args.lhco_dir / f"scalars_bkg{i:02d}.h5" for i in range(1, 9)]
        real = EventBatch.concat(list(replay("lhco-features", files)))["features"]
        print(f"detector variants, {args.detector_scan} QCD events each:", flush=True)
        scan = detector_scan(args.detector_scan, args.seed, real)
        if args.only_scan:
            print(json.dumps({"benchmark": "simulator-detector-scan", "scan": scan}))
            return
    made: list[Path] = []

    print("speed, side by side (same Pythia settings) ...", flush=True)
    bare = [bare_pythia(args.bare_events, args.seed)]
    background, path = produce(component(lhco, "background", args.events), 1, args.seed)
    made.append(path)
    bare.append(bare_pythia(args.bare_events, args.seed + 1))
    two, path = produce(component(lhco, "background", args.events), 2, args.seed)
    made.append(path)
    signal, path = produce(component(lhco, "signal", args.signal_events), 1, args.seed)
    made.append(path)
    full = full_layout_qcd(args.events, args.seed)
    bare_cpu = float(np.mean([b["cpu_per_s"] for b in bare]))
    bare_wall = float(np.mean([b["wall_per_s"] for b in bare]))
    ratio = background["tried_per_s_cpu"] / bare_cpu
    ratio_full = full["cpu_per_s"] / bare_cpu
    scaling = two["kept_per_s_wall"] / background["kept_per_s_wall"]
    # CPU cost per event with 2 workers against 1 (worker start-up included): the
    # scaling that 2 free cores would give.
    cpu_scaling = 2 * two["tried_per_s_cpu"] / background["tried_per_s_cpu"]
    print(f"  bare Pythia next()            {bare_cpu:7.1f} events/CPU-s ({bare_wall:.1f}/wall-s)")
    print(
        f"  lhco-like background, 1 worker {background['tried_per_s_cpu']:7.1f} Pythia "
        f"events/CPU-s = {ratio:.2f} x bare; {background['kept_per_s_cpu']:.1f} selected/CPU-s"
    )
    print(
        f"  lhco-like background, 2 workers {two['kept_per_s_wall']:.1f} selected/wall-s = "
        f"{scaling:.2f} x 1 worker's {background['kept_per_s_wall']:.1f} (wall); CPU per event "
        f"with 2 workers gives {cpu_scaling:.2f} x on 2 free cores"
    )
    print(f"  lhco-like signal, 1 worker     {signal['kept_per_s_cpu']:7.1f} selected/CPU-s")
    print(
        f"  --process qcd, every column    {full['cpu_per_s']:7.1f} events/CPU-s = "
        f"{ratio_full:.2f} x bare"
    )

    print("turn-on of the 1.2 TeV selection in pT-hat ...", flush=True)
    onset = turn_on(args.turn_on_events, args.seed)
    for w in onset["windows"]:
        lo, hi = w["pthat_gev"]
        window = f"{lo:g}-{hi:g}" if hi > 0 else f">{lo:g}"
        print(
            f"  pT-hat {window:>9s} GeV: sigma {w['sigma_pb']:8.2f} pb, selection efficiency "
            f"{w['efficiency']:.4f} ({w['kept']} of {w['tried']})"
        )
    for cut, row in onset["cuts"].items():
        print(
            f"  cut pT-hat > {cut:>4s} GeV: loses {row['selected_lost']:.1%} of selected events, "
            f"{row['pythia_events_per_selected']:.2f} Pythia events per selected event"
        )

    print(f"fidelity: {args.validation_events} selected events ...", flush=True)
    lhco_jets = JetConfig(tau_convention="lhco-features")
    validation = component(lhco, "background", args.validation_events)
    _, like = produce(validation, 1, args.seed + 7, jets=lhco_jets)
    _, shipped = produce(validation, 1, args.seed + 7)
    made += [like, shipped]
    ours = features_of(like, "background")
    default = features_of(shipped, "background")
    files = [args.lhco_dir / f"scalars_bkg{i:02d}.h5" for i in range(1, 9)]
    real = EventBatch.concat(list(replay("lhco-features", files)))["features"]
    table = compare(ours, real)
    table_default = compare(default, real)
    header = ("observable", "median ours", "median LHCO", "KS D", "KS D (FastJet tau)")
    print("{:10s} {:>12s} {:>12s} {:>7s} {:>19s}".format(*header))
    for name, row in table.items():
        print(
            f"{name:10s} {row['median_ours']:12.3f} {row['median_lhco']:12.3f} "
            f"{row['ks_distance']:7.3f} {table_default[name]['ks_distance']:19.3f}"
        )
    plot = args.out_dir / "simulator_validation.png"
    overlay(ours, default, real, plot)
    print(f"plot: {plot}")

    # Is LHCO's own sample cut in pT-hat? Add the 900-1000 GeV window and compare again.
    lower = make_recipe(
        "qcd",
        pthat_min_gev=900.0,
        event_filter=EventFilter(fatjet_pt_gev=LHCO_FATJET_PT_MIN_GEV),
    )
    (bkg,) = component(lhco, "background", args.pthat_check_events).components
    wider = dataclasses.replace(lhco, components=(dataclasses.replace(bkg, process=lower),))
    _, path = produce(wider, 1, args.seed + 9, jets=lhco_jets)
    made.append(path)
    table_900 = compare(features_of(path, "background"), real)
    same_size = compare(ours[: args.pthat_check_events], real)
    for name in ("mj1", "mjj", "tau21_j1"):
        print(
            f"  pT-hat > 900 GeV: {name} median {table_900[name]['median_ours']:.3f}, KS "
            f"{table_900[name]['ks_distance']:.3f} (pT-hat > 1 TeV, same size: "
            f"{same_size[name]['ks_distance']:.3f})"
        )
    for path in made:
        shutil.rmtree(path, ignore_errors=True)

    generation: dict[str, Any] = {}
    replays: dict[str, float] = {}
    if args.process_events:
        print(f"every process, every column, {args.process_events} events, one core:")
        generation = generation_rates(args.process_events, args.seed)
        replays = replay_rates(args.lhco_dir, args.lhco_raw, args.seed)

    n_bkg, n_sig = (c.n_events for c in lhco.components)
    full_run_s = n_bkg / two["kept_per_s_wall"] + n_sig / (signal["kept_per_s_wall"] * scaling)
    print(
        f"estimated wall time of `trigfarm simulate --recipe lhco-like --events {n_bkg}` "
        f"with 2 workers here: {full_run_s / 3600:.1f} h"
    )
    result = {
        "benchmark": "simulator",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "bare_pythia": bare,
        "lhco_like_background_1_worker": background,
        "lhco_like_background_2_workers": two,
        "lhco_like_signal_1_worker": signal,
        "process_qcd_full_layout": full,
        "ratio_vs_bare_pythia": ratio,
        "ratio_full_layout_vs_bare_pythia": ratio_full,
        "scaling_2_workers": scaling,
        "scaling_2_workers_cpu": cpu_scaling,
        "turn_on": onset,
        "generation_per_process": generation,
        "replay_events_per_s": replays,
        "validation": {
            "lhco_tau_convention": table,
            "fastjet_tau_convention": table_default,
            "pthat_900_lhco_tau_convention": table_900,
            "pthat_1000_same_size": same_size,
        },
        "selected_ours": len(ours),
        "selected_lhco": len(real),
        "estimated_full_run_h": full_run_s / 3600,
        "plot": str(plot),
        "ks_tau21_j1": table["tau21_j1"]["ks_distance"],
        "ks_tau21_j2": table["tau21_j2"]["ks_distance"],
        "ks_mj1": table["mj1"]["ks_distance"],
        "ks_delta_mj": table["delta_mj"]["ks_distance"],
        "ks_mjj": table["mjj"]["ks_distance"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
