"""The bump hunt on LHCO R&D 100k: no-signal controls and injected-signal rows.

Every row runs the farm's learning path of ``benchmarks.ephemeral_lhco.stream_once`` (the
real source, two HLT flow learners averaging their flows, the archive), then the scan
(``analysis.scan``: 15 sliding windows of 400 GeV from 2.9 to 6 TeV, fitted 2.8-7 TeV,
working points ε = 1, 0.2, 0.05, 0.01, Poisson-likelihood dijet fits, profile-likelihood
local Z with the fit uncertainty, Bonferroni global p-value) for each method:

- ``anode``: the ANODE ratio at the window's centre mass (the fix for sculpting);
- ``anode_interpolated``: ANODE from the all-data flow alone, its background density
  interpolated across the window from the sidebands (every window);
- ``anode_event_mass`` (only with ``--methods``): the ratio at each event's own mass (the
  old score, which sculpts);
- ``cathode``: CATHODE from flows (sideband-flow samples vs all-data-flow samples);
- ``cwola``: CWoLa from flows (all-data flow at window vs sideband mjj), every window.

ANODE and CATHODE need a sideband flow that never saw the window: the learners train one,
for 3.3-3.7 TeV, so those methods cut only in that window (elsewhere ε = 1 only). CWoLa
from flows and the interpolated ANODE use the all-data flow alone and cut in every window.

No-signal pseudo-experiments (what they are, honestly): ``--controls K`` flow trainings,
each on its own stream of a random half of the 90,941 LHCO background events (no signal);
for each, ``--datasets J`` bump-hunt datasets, each a random half of the same background
(so any two share about half their events, and a dataset shares about half its events
with the stream its flows learned). The classifiers are trained on flow samples only, so
one training serves its J datasets. K x J pseudo-experiments in all; they are correlated
through the shared events, so the false-positive rates below carry more spread than K x J
independent experiments would.

Injected rows: the ephemeral_lhco stream (background bkg01-06, W'->XY from sig01-03 at the
target S/B in 3.3-3.7 TeV) for each ``--seeds``; the bump hunt runs on the stored events
(the stream itself), as ``trigfarm analyze --events`` does.

With ``--dataset PATH`` (a ``trigfarm simulate --recipe lhco-like`` folder, e.g. the
million) the pseudo-experiments are independent: experiment k streams its own block of
``--block-chunks`` background chunks (disjoint from every other block), learns its flows
on it, and runs the bump hunt on the events it stored, as ``trigfarm analyze --events``
does; ``--controls`` blocks are no-signal controls, and each injected (S/B, seed) row takes
the next unused block (from ``--first-block``) and injects W'->XY from the dataset's
signal chunks. ``--controls-from`` takes the controls (and so f) from an earlier run's
``results.json`` instead, for more injected rows than the blocks left over.

The report then measures each method's spurious-signal fraction f on the controls
(``analysis.spurious``) and gives the false-positive rates with f cross-validated: f from
the even-numbered controls applied to the odd ones and back, so that no control is judged
with an f it helped measure. ``--from-results`` reports again from an earlier run's
``results.json``.

    python -m benchmarks.bump_hunt [--controls 4 --datasets 5] [--sb 0.02 0.05] [--seeds 1 2 3]
    python -m benchmarks.bump_hunt --dataset ~/.cache/trigfarm/datasets/lhco-like-... \
        --controls 20 --block-chunks 5
    python -m benchmarks.bump_hunt --dataset ... --controls 0 --controls-from \
        out/bump_hunt/results.json --sb 0.01 0.02 --seeds 4 5 6 --block-chunks 4
    python -m benchmarks.bump_hunt --dataset ... --block-chunks 2 --uncut-toys 100  # global p
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from analysis.bumphunt import local_pvalue, local_significance
from analysis.classifier import ClassifierConfig
from analysis.data import Events
from analysis.methods import SearchConfig
from analysis.scan import (
    FlowSets,
    ScanConfig,
    ScanResult,
    Window,
    plot_pvalues,
    plot_spectra,
    scan,
    trials_pvalue,
    window_scorer,
    z_of,
)
from analysis.spurious import spurious_fraction
from benchmarks.ephemeral_lhco import (
    DATA,
    SR,
    Dataset,
    cache_spec,
    files,
    lhco_dataset,
    require_complete,
    sr_fraction,
    stream_once,
)
from models.archive import Archive
from nodes.learner import FlowLearnerConfig
from simulator.dataset import dataset_files
from simulator.replay import expand_paths, read_features, reader_for
from stream.batch import EventBatch
from stream.eventfile import CacheWriter

METHODS = ("anode", "anode_interpolated", "cathode", "cwola")
#: What ``--methods`` may name besides.
ALL_METHODS = (*METHODS, "anode_event_mass")


def all_background() -> EventBatch:
    paths = expand_paths(files("bkg", range(1, 11)))
    return EventBatch.concat(
        reader_for("lhco-features")(paths, chunk_size=65_536, skip_bad_rows=True)
    )


def half_of(background: EventBatch, rng: np.random.Generator) -> EventBatch:
    rows = np.sort(rng.choice(len(background), len(background) // 2, replace=False))
    return background.select(rows)


def train(
    dataset: Dataset,
    sb: float,
    seed: int,
    learner_config: FlowLearnerConfig,
    tmp: Path,
) -> tuple[dict[str, Any], Archive]:
    stream_bkg = Events(*read_features([dataset.stream_background]))
    injected = Events(*read_features([dataset.injected_signal]))
    stream = stream_once(
        sb,
        dataset,
        n_nodes=2,
        learner_config=learner_config,
        archive_dir=tmp / "archive",
        seed=seed,
        p_bkg_sr=sr_fraction(stream_bkg),
        p_sig_sr=sr_fraction(injected),
        n_background=len(stream_bkg),
    )
    return stream, Archive(tmp / "archive")


def cached_scorers(
    flows: FlowSets,
    search: SearchConfig,
    features: np.ndarray,
    windows: tuple[Window, ...],
    methods: tuple[str, ...] = METHODS,
) -> dict[str, dict[Window, np.ndarray | None]]:
    """Each method's scores of ``features`` in every window (each classifier trained once)."""
    out: dict[str, dict[Window, np.ndarray | None]] = {}
    for method in methods:
        scorer = window_scorer(method, flows, search, features)
        out[method] = {w: scorer(w) for w in windows}
    return out


def scan_rows(
    scores: dict[str, dict[Window, np.ndarray | None]],
    mjj: np.ndarray,
    rows: np.ndarray | slice,
    config: ScanConfig,
) -> dict[str, ScanResult]:
    results = {}
    for method, by_window in scores.items():

        def scorer(window: Window, by_window: Any = by_window) -> np.ndarray | None:
            s = by_window[window]
            return None if s is None else s[rows]

        results[method] = scan(mjj[rows], scorer, config)
    return results


def record(result: ScanResult) -> dict[str, Any]:
    return {
        "global_pvalue": result.global_pvalue,
        "global_z": result.global_significance,
        "n_trials": result.n_trials,
        "tests": [
            [
                *b.window_gev,
                b.efficiency,
                b.significance,
                b.pvalue,
                b.observed_sr,
                b.expected_sr,
                b.expected_sr_error,
            ]
            for b in result.bumps
        ],
    }


def control_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """False-positive rates of one method over the no-signal pseudo-experiments."""
    z = np.array([[t[3] for t in r["tests"]] for r in runs])  # (experiments, tests)
    cells = [tuple(t[:3]) for t in runs[0]["tests"]]
    cut = np.array([c[2] < 1 for c in cells])
    finite = np.isfinite(z)
    exceed = np.where(finite, np.abs(z) >= 2, False)
    pass_rate = 1 - exceed.mean(axis=0)
    worst = int(np.argmin(pass_rate))
    global_p = np.array([r["global_pvalue"] for r in runs])
    return {
        "experiments": len(runs),
        "tests_per_experiment": len(cells),
        "failed_fits": int((~finite).sum()),
        "local_abs_z_ge_2_rate": float(exceed[finite].mean()) if finite.any() else None,
        "local_abs_z_ge_2_rate_cuts_only": float(exceed[:, cut][finite[:, cut]].mean())
        if cut.any()
        else None,
        "local_z_ge_2_rate": float(np.where(finite, z >= 2, False)[finite].mean()),
        "mean_local_z_cuts_only": float(np.nanmean(z[:, cut])) if cut.any() else None,
        "max_abs_local_z": float(np.nanmax(np.abs(z))),
        "cells_below_95pct": int((pass_rate < 0.95).sum()),
        # A calibrated test has |Z| >= 2 with p = 4.55%; a cell falls below 95% when more
        # than 5% of its experiments exceed, which happens by chance this often:
        "cells_below_95pct_if_calibrated": float(
            len(cells) * stats.binom.sf(int(0.05 * len(runs)), len(runs), 2 * stats.norm.sf(2))
        ),
        "cells": len(cells),
        "worst_cell": {"window_eff": cells[worst], "pass_rate": float(pass_rate[worst])},
        "experiments_all_abs_z_lt_2": float((~exceed).all(axis=1).mean()),
        "global_p_lt_0.05_rate": float(np.mean(global_p < 0.05)),
        "global_z_ge_2_rate": float(np.mean([r["global_z"] >= 2 for r in runs])),
        "median_global_p": float(np.median(global_p)),
    }


def signal_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Local Z in the signal window 3.3-3.7 TeV (largest over cuts) and global Z."""
    local = []
    for r in runs:
        zs = [t[3] for t in r["tests"] if (t[0], t[1]) == SR and t[2] < 1 and np.isfinite(t[3])]
        local.append(max(zs) if zs else float("nan"))
    glob = [max(r["global_z"], 0.0) for r in runs]  # global p >= 0.5 counts as Z = 0
    return {
        "seeds": len(runs),
        "local_z_sr": local,
        "median_local_z_sr": float(np.nanmedian(local)),
        "mean_local_z_sr": float(np.nanmean(local)),
        "std_local_z_sr": float(np.nanstd(local)),
        "global_z": glob,
        "median_global_z": float(np.nanmedian(glob)),
        "mean_global_z": float(np.nanmean(glob)),
        "std_global_z": float(np.nanstd(glob)),
        "global_p_lt_0.05": float(np.mean([r["global_pvalue"] < 0.05 for r in runs])),
    }


def cut_tests(runs: list[dict[str, Any]]) -> np.ndarray:
    """(n, b) of every test with a cut, pooled over ``runs``."""
    rows = [t[5:7] for r in runs for t in r["tests"] if t[2] < 1]
    return np.array(rows, np.float64).reshape(-1, 2)


def with_spurious(run: dict[str, Any], fraction: float) -> dict[str, Any]:
    """The run's tests with ``fraction`` of b in σ_b after every cut, and the Bonferroni
    global p-value recomputed from them."""
    tests = []
    for t in run["tests"]:
        lo, hi, eff, z, p, n, b, sigma = t
        if eff < 1 and np.isfinite(b):
            z = local_significance(n, b, sigma, fraction)
            p = local_pvalue(z)
        tests.append([lo, hi, eff, z, p, n, b, sigma])
    p_global = trials_pvalue([t[4] for t in tests])
    return {**run, "tests": tests, "global_pvalue": p_global, "global_z": z_of(p_global)}


def calibrate(
    controls: dict[str, list[dict[str, Any]]], injected: dict[str, dict[str, list[dict[str, Any]]]]
) -> dict[str, Any]:
    """Each method's spurious-signal fraction f on all controls (with a bootstrap spread
    over experiments), the controls' false-positive rates with f cross-validated (f from
    the even experiments applied to the odd ones and back), and the injected rows with f."""
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    for method, runs in controls.items():
        tests = cut_tests(runs)
        if not tests.size:
            continue
        f_all = spurious_fraction(*tests.T)
        resamples = (rng.integers(len(runs), size=len(runs)) for _ in range(200))
        boot = [spurious_fraction(*cut_tests([runs[i] for i in rows]).T) for rows in resamples]
        halves = (runs[0::2], runs[1::2])
        folds = [spurious_fraction(*cut_tests(h).T) for h in halves]
        crossed = [with_spurious(r, folds[1]) for r in halves[0]] + [
            with_spurious(r, folds[0]) for r in halves[1]
        ]
        out[method] = {
            "spurious_fraction": f_all,
            "spurious_fraction_bootstrap_std": float(np.std(boot)),
            "spurious_fraction_by_half": folds,
            "controls_cross_validated": control_summary(crossed),
            "injected": {
                sb: signal_summary([with_spurious(r, f_all) for r in by_method[method]])
                for sb, by_method in injected.items()
                if by_method.get(method)
            },
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--controls", type=int, default=4, help="no-signal flow trainings")
    parser.add_argument("--datasets", type=int, default=5, help="bump-hunt datasets per training")
    parser.add_argument("--sb", type=float, nargs="*", default=[0.02, 0.05])
    parser.add_argument("--seeds", type=int, nargs="*", default=[1, 2, 3])
    parser.add_argument("--members", type=int, default=5, help="MAFs per flow")
    parser.add_argument("--samples", type=int, default=10_000, help="flow samples per class")
    parser.add_argument("--out", default="out/bump_hunt")
    parser.add_argument(
        "--dataset",
        type=Path,
        help="a `trigfarm simulate --recipe` folder: independent experiments on its chunks",
    )
    parser.add_argument(
        "--block-chunks", type=int, default=5, help="with --dataset: chunks per experiment"
    )
    parser.add_argument(
        "--first-block", type=int, default=0, help="with --dataset: the first block to use"
    )
    parser.add_argument(
        "--controls-from",
        type=Path,
        help="with --dataset: take the controls (and f) from an earlier run's results.json",
    )
    parser.add_argument(
        "--methods", nargs="+", choices=ALL_METHODS, default=list(METHODS), help="methods to run"
    )
    parser.add_argument(
        "--uncut-toys",
        type=int,
        default=0,
        help="with --dataset: only scan every block's uncut spectrum, with this many toys "
        "for the global p-value, and test that it is uniform",
    )
    parser.add_argument(
        "--from-results",
        type=Path,
        help="report again from the raw records of an earlier run's results.json",
    )
    args = parser.parse_args(argv)
    if args.from_results:
        earlier = json.loads(args.from_results.read_text())
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        return report(
            ScanConfig(),
            earlier["raw"]["controls"],
            earlier["raw"]["injected"],
            out,
            time.perf_counter(),
            earlier["data"],
        )
    if args.dataset and args.uncut_toys:
        return uncut_global_pvalues(args)
    if args.dataset:
        return run_on_dataset(args)
    if not DATA.exists():
        print(f"no data at {DATA} (see ../shared/data/README.md)")
        return 1
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = ScanConfig()
    learner_config = _learner_config(args.members)
    t_start = time.perf_counter()
    methods = tuple(args.methods)
    controls: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    background = all_background()
    print(f"{len(background)} LHCO background events; {len(config.windows_gev)} windows")
    for k in range(args.controls):
        seed = 100 + k
        rng = np.random.default_rng(seed)
        tmp = Path(tempfile.mkdtemp(prefix="bumphunt-"))
        stream_path = tmp / "stream.h5"
        with CacheWriter(stream_path) as writer:
            writer.append(half_of(background, rng))
        base = lhco_dataset(quick=False)
        dataset = Dataset("LHCO background half", f"cache:{stream_path}", *_rest(base))
        print(f"control {k}: flows on a random half of the background (seed {seed})")
        t0 = time.perf_counter()
        _, archive = train(dataset, 0.0, seed, _seeded(learner_config, seed), tmp)
        flows = FlowSets(archive.snapshots(latest_per_node=True))
        datasets = [half_of(background, rng) for _ in range(args.datasets)]
        features = np.concatenate([np.asarray(d["features"], np.float64) for d in datasets])
        bounds = np.cumsum([0] + [len(d) for d in datasets])
        t1 = time.perf_counter()
        scores = cached_scorers(
            flows, _search(args.samples, seed), features, config.windows_gev, methods
        )
        print(f"  stream {t1 - t0:.0f} s, scores {time.perf_counter() - t1:.0f} s", flush=True)
        for j in range(args.datasets):
            rows = slice(bounds[j], bounds[j + 1])
            results = scan_rows(scores, features[:, 0], rows, config)
            for method, result in results.items():
                controls[method].append(record(result))
                if k == 0 and j == 0:
                    plot_pvalues(result, out / f"control_{method}_pvalues.png")
                    plot_spectra(result, out / f"control_{method}_spectra.png")
            worst = {
                m: np.nanmax(np.abs([t[3] for t in controls[m][-1]["tests"]])) for m in methods
            }
            print(
                f"  dataset {j}: max |local Z| "
                + ", ".join(f"{m} {z:.2f}" for m, z in worst.items())
                + "; global p "
                + ", ".join(f"{m} {controls[m][-1]['global_pvalue']:.2f}" for m in methods),
                flush=True,
            )
        shutil.rmtree(tmp)
    injected: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for sb in args.sb:
        injected[f"{sb:g}"] = {m: [] for m in methods}
        for seed in args.seeds:
            tmp = Path(tempfile.mkdtemp(prefix="bumphunt-"))
            print(f"S/B {sb:g}, seed {seed}")
            t0 = time.perf_counter()
            stream, archive = train(
                lhco_dataset(quick=False), sb, seed, _seeded(learner_config, seed), tmp
            )
            flows = FlowSets(archive.snapshots(latest_per_node=True))
            stored = archive.event_features().astype(np.float64)
            t1 = time.perf_counter()
            scores = cached_scorers(
                flows, _search(args.samples, seed), stored, config.windows_gev, methods
            )
            print(f"  stream {t1 - t0:.0f} s, scores {time.perf_counter() - t1:.0f} s", flush=True)
            results = scan_rows(scores, stored[:, 0], slice(None), config)
            for method, result in results.items():
                injected[f"{sb:g}"][method].append(
                    {**record(result), "sr_signal": stream["sr_signal"]}
                )
                if seed == args.seeds[0]:
                    plot_pvalues(result, out / f"sb_{sb:g}_{method}_pvalues.png")
                    plot_spectra(result, out / f"sb_{sb:g}_{method}_spectra.png")
                best = result.best()
                print(
                    f"  {method:18s} SR signal {stream['sr_signal']}: best local Z "
                    f"{best.significance if best else float('nan'):.2f} in "
                    f"{best.window_gev if best else None} eps {best.efficiency if best else None}"
                    f"; global p {result.global_pvalue:.3g} (Z {result.global_significance:.2f})",
                    flush=True,
                )
            shutil.rmtree(tmp)
    return report(config, controls, injected, out, t_start, "LHCO R&D 100k")


def report(
    config: ScanConfig,
    controls: dict[str, list[dict[str, Any]]],
    injected: dict[str, dict[str, list[dict[str, Any]]]],
    out: Path,
    t_start: float,
    data_name: str,
) -> int:
    """Summarise, print and write the controls' false-positive rates and the injected rows."""
    summary: dict[str, Any] = {
        "benchmark": "bump_hunt",
        "data": data_name,
        "windows": len(config.windows_gev),
        "efficiencies": list(config.efficiencies),
        "global_method": "Bonferroni trials factor (windows x working points with a valid fit)",
        "controls": {m: control_summary(runs) for m, runs in controls.items() if runs},
        "injected": {
            sb: {m: signal_summary(runs) for m, runs in by_method.items() if runs}
            for sb, by_method in injected.items()
        },
        "calibrated": calibrate(controls, injected),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread",
        "total_s": time.perf_counter() - t_start,
    }
    print("\nno-signal controls (local |Z| >= 2 expected in 4.6% of tests if calibrated):")
    for method, c in summary["controls"].items():
        print(
            f"  {method:18s} {c['experiments']} experiments: |Z|>=2 in "
            f"{100 * c['local_abs_z_ge_2_rate']:.1f}% of tests "
            f"({100 * (c['local_abs_z_ge_2_rate_cuts_only'] or 0):.1f}% of those after cuts), "
            f"max |Z| {c['max_abs_local_z']:.2f}; cells below 95%: {c['cells_below_95pct']}"
            f"/{c['cells']} ({c['cells_below_95pct_if_calibrated']:.1f} by chance if "
            f"calibrated); global p<0.05 in {100 * c['global_p_lt_0.05_rate']:.0f}%"
        )
    for sb, by_method in summary["injected"].items():
        print(f"S/B {sb}:")
        for method, s in by_method.items():
            print(
                f"  {method:18s} local Z in 3.3-3.7 TeV {s['mean_local_z_sr']:.2f} ± "
                f"{s['std_local_z_sr']:.2f} (median {s['median_local_z_sr']:.2f}); global Z "
                f"{s['mean_global_z']:.2f} ± {s['std_global_z']:.2f} "
                f"(median {s['median_global_z']:.2f})"
            )
    print("\nwith the spurious-signal fraction f (cross-validated on the controls: f from the")
    print("even experiments applied to the odd ones and back):")
    for method, c in summary["calibrated"].items():
        x = c["controls_cross_validated"]
        print(
            f"  {method:18s} f = {c['spurious_fraction']:.4f} ± "
            f"{c['spurious_fraction_bootstrap_std']:.4f} (halves "
            + ", ".join(f"{f:.4f}" for f in c["spurious_fraction_by_half"])
            + f"): |Z|>=2 in {100 * x['local_abs_z_ge_2_rate']:.1f}% of tests "
            f"({100 * (x['local_abs_z_ge_2_rate_cuts_only'] or 0):.1f}% after cuts, mean Z "
            f"{x['mean_local_z_cuts_only'] or 0:+.2f}); cells below 95%: "
            f"{x['cells_below_95pct']}/{x['cells']}; global p<0.05 in "
            f"{100 * x['global_p_lt_0.05_rate']:.0f}%"
        )
        for sb, inj in c["injected"].items():
            print(
                f"    S/B {sb}: local Z in 3.3-3.7 TeV {inj['mean_local_z_sr']:.2f} ± "
                f"{inj['std_local_z_sr']:.2f}; global Z {inj['mean_global_z']:.2f} ± "
                f"{inj['std_global_z']:.2f}"
            )
    raw = {"controls": controls, "injected": injected}
    (out / "results.json").write_text(json.dumps({**summary, "raw": raw}, default=float))
    print(json.dumps(summary, default=float))
    return 0


def uncut_global_pvalues(args: argparse.Namespace) -> int:
    """The plain dijet scan (no cut) of every disjoint block, with the toy and the trials
    global p-values: on background alone the toys' should be uniform (KS test)."""
    require_complete(args.dataset)
    chunks = dataset_files(args.dataset, "background")
    n_blocks = len(chunks) // args.block_chunks
    toys = ScanConfig(efficiencies=(1.0,), global_method="toys", n_toys=args.uncut_toys)
    t_start = time.perf_counter()
    rows = []
    for block in range(n_blocks):
        part = chunks[block * args.block_chunks : (block + 1) * args.block_chunks]
        mjj = Events(*read_features([cache_spec(part)])).mjj
        by_toys = scan(mjj, None, replace(toys, seed=block))
        best = by_toys.best()
        rows.append(
            {
                "block": block,
                "events": len(mjj),
                "local_z": [b.significance for b in by_toys.bumps],
                "min_local_p": best.pvalue if best else float("nan"),
                "global_p_toys": by_toys.global_pvalue,
                "global_p_trials": trials_pvalue([b.pvalue for b in by_toys.bumps]),
            }
        )
        print(
            f"block {block}: {len(mjj)} events, max local Z "
            f"{best.significance if best else float('nan'):.2f}, global p (toys) "
            f"{by_toys.global_pvalue:.3f}",
            flush=True,
        )
    local = np.array([z for r in rows for z in r["local_z"]])
    toy_p = np.array([r["global_p_toys"] for r in rows])
    summary = {
        "benchmark": "bump_hunt_uncut_toys",
        "data": f"{args.dataset.name}, disjoint blocks of {args.block_chunks} chunks",
        "blocks": n_blocks,
        "windows": len(toys.windows_gev),
        "toys": args.uncut_toys,
        "local_abs_z_ge_2_rate": float(np.mean(np.abs(local) >= 2)),
        "local_z_mean": float(np.mean(local)),
        "local_z_std": float(np.std(local)),
        "global_p_toys_lt_0.05_rate": float(np.mean(toy_p < 0.05)),
        "global_p_trials_lt_0.05_rate": float(np.mean([r["global_p_trials"] < 0.05 for r in rows])),
        "global_p_toys_ks_uniform_pvalue": float(stats.kstest(toy_p, "uniform").pvalue),
        "total_s": time.perf_counter() - t_start,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "uncut_toys.json").write_text(json.dumps({**summary, "rows": rows}, default=float))
    print(json.dumps(summary, default=float))
    return 0


def run_on_dataset(args: argparse.Namespace) -> int:
    """Independent experiments, one disjoint block of chunks each (see the module doc)."""
    require_complete(args.dataset)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = ScanConfig()
    learner_config = _learner_config(args.members)
    chunks = dataset_files(args.dataset, "background")
    signal = cache_spec(dataset_files(args.dataset, "signal"))
    n_blocks = len(chunks) // args.block_chunks
    wanted = args.controls + len(args.sb) * len(args.seeds)
    if args.first_block + wanted > n_blocks:
        print(
            f"{wanted} experiments from block {args.first_block} need blocks up to "
            f"{args.first_block + wanted - 1}; {args.dataset} holds {n_blocks}"
        )
        return 1
    methods = tuple(args.methods)
    blocks = iter(range(args.first_block, n_blocks))
    t_start = time.perf_counter()

    def experiment(sb: float, seed: int) -> tuple[dict[str, Any], dict[str, ScanResult]]:
        block = next(blocks)
        part = chunks[block * args.block_chunks : (block + 1) * args.block_chunks]
        stream_spec = cache_spec(part)
        dataset = Dataset(f"block {block}", stream_spec, signal, stream_spec, ())
        tmp = Path(tempfile.mkdtemp(prefix="bumphunt-"))
        t0 = time.perf_counter()
        stream, archive = train(dataset, sb, seed, _seeded(learner_config, seed), tmp)
        flows = FlowSets(archive.snapshots(latest_per_node=True))
        stored = archive.event_features().astype(np.float64)
        t1 = time.perf_counter()
        scores = cached_scorers(
            flows, _search(args.samples, seed), stored, config.windows_gev, methods
        )
        results = scan_rows(scores, stored[:, 0], slice(None), config)
        shutil.rmtree(tmp)
        print(
            f"block {block} (S/B {sb:g}, seed {seed}, {len(stored)} events, SR signal "
            f"{stream['sr_signal']}): stream {t1 - t0:.0f} s, scores "
            f"{time.perf_counter() - t1:.0f} s; global p "
            + ", ".join(f"{m} {r.global_pvalue:.2f}" for m, r in results.items()),
            flush=True,
        )
        return stream, results

    controls: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    if args.controls_from:
        earlier = json.loads(args.controls_from.read_text())["raw"]["controls"]
        controls = {m: list(earlier.get(m, [])) for m in methods}
    for k in range(args.controls):
        _, results = experiment(0.0, 100 + k)
        for method, result in results.items():
            controls[method].append(record(result))
            if k == 0:
                plot_pvalues(result, out / f"control_{method}_pvalues.png")
                plot_spectra(result, out / f"control_{method}_spectra.png")
    injected: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for sb in args.sb:
        injected[f"{sb:g}"] = {m: [] for m in methods}
        for seed in args.seeds:
            stream, results = experiment(sb, seed)
            for method, result in results.items():
                injected[f"{sb:g}"][method].append(
                    {**record(result), "sr_signal": stream["sr_signal"]}
                )
    name = f"{args.dataset.name}, independent blocks of {args.block_chunks} chunks"
    if args.controls_from:
        name += f"; controls from {args.controls_from}"
    return report(config, controls, injected, out, t_start, name)


def _rest(base: Dataset) -> tuple[str, str, tuple[str, ...]]:
    return base.injected_signal, base.idealised_background, base.test


def _learner_config(members: int) -> FlowLearnerConfig:
    """The shipped learner (``members`` MAFs per flow), averaging across 2 nodes."""
    return FlowLearnerConfig(
        n_transforms=4,
        n_members=members,
        calibration_events=2000,
        snapshot_every_events=20_000,
        signal_region_gev=SR,
        average_every_steps=10,
    )


def _seeded(config: FlowLearnerConfig, seed: int) -> FlowLearnerConfig:
    return replace(config, seed=seed)


def _search(samples: int, seed: int) -> SearchConfig:
    return SearchConfig(
        signal_region_gev=SR,
        n_samples=samples,
        classifier=ClassifierConfig(n_models=1, epochs=8, seed=seed),
        seed=seed,
    )


if __name__ == "__main__":
    raise SystemExit(main())
