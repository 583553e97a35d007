"""A scalar-sum (ETT) trigger on a pileup ramp, with a fixed and with a controlled threshold.

A library of Pythia 8 minimum-bias events (``SoftQCD:nonDiffractive``, MPI on) is generated
once; each event's ETT is the scalar sum of the pT of its visible final-state particles
with pT > 1 GeV and |eta| < 2.5. A bunch crossing overlays Poisson(mu) events drawn at
random from the library (premixing), and a scalar sum premixes exactly: the crossing's
ETT is the sum of its events'. mu ramps from 40 to 80 over the lumi blocks; each block
holds ``--crossings`` crossings at 40 MHz. The ETT path fires above its threshold; the
fixed threshold is calibrated to ``--target-hz`` at mu = 40, the controlled one starts
there and is moved by ``nodes.rate_control.RateController`` after every block. The true
rate of each block's threshold is measured on an independent set of crossings at that mu.

    python -m benchmarks.trigger_rates --out benchmarks/out/trigger_rates

Prints a JSON summary and writes ``rate_vs_lumi.png``.

The default menu (``--menu``): ``--crossings`` weighted bunch crossings of the source's
``inclusive`` sample with pileup premixed at ``--mu`` (``weighting = "crossing"``, as in
``deploy/topologies/default.toml``) go through the L1 node's seeds and emulated VAE and the
HLT node's tagger, in this process. Each path's threshold is calibrated to its share of
the stage's budget on the sample itself (``firmware.calibrate.calibrate_threshold``: measured, with
the threshold's statistical range), the shares scaled so that the stage's OR lands on its
budget (L1 100 kHz, HLT 1 kHz of what the L1 keeps); then the menu is evaluated on the
same sample (rates per path and stage with sqrt(sum w^2) errors, reductions).

    python -m benchmarks.trigger_rates --menu --crossings 6000 --seed 11 \
        --out benchmarks/out/menu

Writes ``menu.json`` (thresholds, rates) and ``observables.npz`` (per crossing: weight,
process id, every path's observable), which ``--menu --reuse`` recalibrates from;
``--merge other/observables.npz`` pools independent samples (other seeds).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np

from firmware.calibrate import RateCalibration, calibrate_threshold
from nodes.rate_control import RateControlConfig
from simulator.generator import make_pythia
from simulator.recipes import MinimumBias

CROSSING_HZ = 40e6


def minbias_ett(n_events: int, seed: int) -> np.ndarray:
    """ETT (GeV) of ``n_events`` minimum-bias events."""
    pythia = make_pythia(MinimumBias(name="minbias", process_id=10), seed)
    out = []
    data = pythia.particleData
    visible: dict[int, bool] = {}
    while sum(len(x) for x in out) < n_events:
        raw = pythia.nextBatch(min(2000, n_events), "skip")
        prt = raw.prt
        final = prt[prt.status > 0]
        pid = ak.to_numpy(ak.flatten(final.id))
        for code in np.unique(pid).tolist():
            if code not in visible:
                visible[code] = bool(data.isVisible(code))
        px, py, pz = (ak.flatten(getattr(final.p, k)) for k in ("px", "py", "pz"))
        pt = np.hypot(ak.to_numpy(px), ak.to_numpy(py))
        eta = np.arcsinh(ak.to_numpy(pz) / np.maximum(pt, 1e-9))
        keep = np.array([visible[c] for c in pid.tolist()]) & (pt > 1.0) & (np.abs(eta) < 2.5)
        owner = np.repeat(np.arange(len(raw)), ak.to_numpy(ak.num(final.id)))
        out.append(np.bincount(owner[keep], pt[keep], minlength=len(raw)))
    return np.concatenate(out)[:n_events]


def premix(library: np.ndarray, mu: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """ETT of ``n`` crossings, each Poisson(mu) events drawn from ``library``."""
    counts = rng.poisson(mu, n)
    draws = library[rng.integers(0, library.size, int(counts.sum()))]
    return np.bincount(np.repeat(np.arange(n), counts), draws, minlength=n)


#: Each L1 path's share of the L1 budget before scaling (their OR overlaps).
L1_SHARES = {"single_jet": 0.55, "ht": 0.3, "met": 0.15}
#: L1 seeds at fixed, CMS-like thresholds whose (small) rates are measured, not set.
L1_FIXED = {"single_egamma": 25.0, "single_muon": 20.0}
#: The anomaly path's budget: the first of these the sample can measure (a threshold
#: below the rate of one of the sample's crossings cannot be set without extrapolating).
L1_ANOMALY_HZ = (3e3, 5e3, 10e3, 20e3)
HLT_SHARES = {"fatjet_pt": 0.6, "tag_w": 0.4}
HLT_ANOMALY_HZ = (100.0, 200.0, 400.0)
HLT_TAG_JET_PT_GEV = 300.0


def menu_observables(
    n: int, *, seed: int, mu: float, pileup_tilt_per_gev: float = 0.0
) -> dict[str, np.ndarray]:
    """Generate ``n`` crossings as the default source does (with busy pileup favoured by
    ``pileup_tilt_per_gev``, weighted back) and measure every path's observable on each
    (L1 seeds and R_z, then the HLT's fat-jet pT, tags and score)."""
    from firmware.scores import r_z
    from nodes.hlt import HLTConfig
    from nodes.hlt import build as build_hlt
    from nodes.l1 import L1Config, seed_observables
    from nodes.l1 import build as build_l1
    from nodes.source import Source, SourceConfig
    from stream.batch import EventBatch

    source = Source(
        SourceConfig(
            background=(
                f"inclusive?pileup_tilt_per_gev={pileup_tilt_per_gev}"
                if pileup_tilt_per_gev
                else "inclusive",
            ),
            weighting="crossing",
            pileup_mu=mu,
            batch_size=256,
            max_events=n,
            seed=seed,
            events_per_lumi=1_000_000,
        ),
        name="calibration",
    )
    batches: list[EventBatch] = []
    while (outcome := source.produce()) is not None:
        batches += [e.message for e in outcome.emits if isinstance(e.message, EventBatch)]
    source.finish()
    config = L1Config(seeds=(*L1_SHARES, *L1_FIXED), threshold=1e30)
    l1 = build_l1(config, name="calibration")
    hlt = build_hlt(HLTConfig(tag_jet_pt_gev=HLT_TAG_JET_PT_GEV), name="calibration")
    columns: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        values = seed_observables(config, batch)
        mu_z, log_var = l1.emulator.encode(l1.scaling.apply(batch["l1_objects"]))
        values["anomaly"] = r_z(mu_z, log_var)
        tags, score = hlt._tag(batch)  # the node's own tagging, run offline
        jet_pt = np.asarray(batch["fatjets"][:, :2, 0], np.float64)
        w_index = hlt.tagger.classes.index("w")
        tag_w = np.where(
            jet_pt >= HLT_TAG_JET_PT_GEV, np.nan_to_num(tags[..., w_index], nan=-1), -1
        )
        values |= {
            "weight": batch.truth["weight"].astype(np.float64),
            "process_id": batch.truth["process_id"].astype(np.int64),
            "hlt_fatjet_pt": jet_pt.max(axis=1),
            "hlt_tag_w": tag_w.max(axis=1),
            "hlt_anomaly": np.nan_to_num(score.astype(np.float64), nan=-np.inf),
        }
        for key, value in values.items():
            columns.setdefault(key, []).append(np.asarray(value))
    out = {key: np.concatenate(value) for key, value in columns.items()}
    out["hz_per_weight"] = np.array(source.hz_per_weight)
    return out


def _rate(mask: np.ndarray, w: np.ndarray, hz_per_event: float) -> dict[str, float]:
    return {
        "rate_hz": hz_per_event * float(w[mask].sum()),
        "error_hz": hz_per_event * float(np.sqrt(np.square(w[mask]).sum())),
        "events": int(mask.sum()),
    }


def _calibrate_stage(
    obs: dict[str, np.ndarray],
    keys: dict[str, str],
    shares: dict[str, float],
    budget_hz: float,
    within: np.ndarray,
    hz_per_event: float,
    *,
    fixed_thresholds: dict[str, float],
    anomaly_hz: tuple[float, ...],
) -> dict[str, Any]:
    """Thresholds for each path (``keys``: path -> observable) among events ``within``:
    the anomaly path gets the first budget the sample can measure, the fixed paths their
    thresholds, and the shares of the rest are scaled together (bisection) so that the
    OR of all paths has ``budget_hz``."""
    w = np.where(within, obs["weight"], 0.0)

    def values(path: str) -> np.ndarray:
        return np.where(within, obs[keys[path]], -np.inf)

    anomaly: RateCalibration | None = None
    for target in anomaly_hz:
        try:
            anomaly = calibrate_threshold(
                values("anomaly"), w, hz_per_event=hz_per_event, target_hz=target
            )
            break
        except ValueError as exc:
            print(f"anomaly at {target:g} Hz: {exc}")
    if anomaly is None:
        msg = f"no anomaly budget in {anomaly_hz} is measurable on this sample"
        raise ValueError(msg)
    base = values("anomaly") > anomaly.threshold
    for path, threshold in fixed_thresholds.items():
        base |= values(path) > threshold

    def menu(scale: float) -> tuple[dict[str, RateCalibration], np.ndarray]:
        cal: dict[str, RateCalibration] = {}
        fired = base.copy()
        for path, share in shares.items():
            target = scale * share * budget_hz
            cal[path] = calibrate_threshold(
                values(path), w, hz_per_event=hz_per_event, target_hz=target
            )
            fired |= values(path) > cal[path].threshold
        return cal, fired

    low, high = 0.05, 4.0
    for _ in range(30):
        mid = 0.5 * (low + high)
        try:
            _, fired = menu(mid)
        except ValueError:
            low = mid
            continue
        if hz_per_event * w[fired].sum() > budget_hz:
            high = mid
        else:
            low = mid
    cal, fired = menu(low)
    thresholds = {p: c.threshold for p, c in cal.items()} | fixed_thresholds
    thresholds["anomaly"] = anomaly.threshold
    paths = {p: _rate(values(p) > t, w, hz_per_event) for p, t in thresholds.items()}
    return {
        "scale": low,
        "thresholds": thresholds,
        "calibrations": {p: asdict(c) for p, c in (cal | {"anomaly": anomaly}).items()},
        "path_rates": paths,
        "fired": fired,
    }


def run_menu(args: argparse.Namespace) -> int:
    """Calibrate and evaluate the default menu (see the module doc)."""
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "observables.npz"
    t0 = time.perf_counter()
    if args.reuse and path.is_file():
        obs = dict(np.load(path))
    else:
        obs = menu_observables(
            args.crossings, seed=args.seed, mu=args.mu, pileup_tilt_per_gev=args.pileup_tilt
        )
        np.savez_compressed(path, **obs)
    sample_s = time.perf_counter() - t0
    for extra in args.merge:
        # Independent samples of the same source: their crossings pool (N adds up).
        more = dict(np.load(extra))
        obs = {
            k: v if k == "hz_per_weight" else np.concatenate([v, more[k]]) for k, v in obs.items()
        }
    n = obs["weight"].size
    hz_per_event = float(obs["hz_per_weight"]) / n
    everything = np.ones(n, bool)
    l1 = _calibrate_stage(
        obs,
        {p: p for p in (*L1_SHARES, *L1_FIXED, "anomaly")},
        L1_SHARES,
        args.l1_budget_hz,
        everything,
        hz_per_event,
        fixed_thresholds=L1_FIXED,
        anomaly_hz=L1_ANOMALY_HZ,
    )
    hlt = _calibrate_stage(
        obs,
        {"fatjet_pt": "hlt_fatjet_pt", "tag_w": "hlt_tag_w", "anomaly": "hlt_anomaly"},
        HLT_SHARES,
        args.hlt_budget_hz,
        l1.pop("fired"),
        hz_per_event,
        fixed_thresholds={},
        anomaly_hz=HLT_ANOMALY_HZ,
    )
    w = obs["weight"]
    hlt_fired = hlt.pop("fired")
    l1_fired = np.zeros(n, bool)
    for p, t in l1["thresholds"].items():
        l1_fired |= obs[p] > t
    source = _rate(everything, w, hz_per_event)
    l1_rate = _rate(l1_fired, w, hz_per_event)
    hlt_rate = _rate(hlt_fired, w, hz_per_event)
    summary = {
        "crossings": n,
        "mu": args.mu,
        "pileup_tilt_per_gev": args.pileup_tilt,
        "seed": args.seed,
        "merged": [str(m) for m in args.merge],
        "sample_s": sample_s,
        "source": source,
        "l1": l1_rate,
        "hlt": hlt_rate,
        "l1_reduction": source["rate_hz"] / l1_rate["rate_hz"],
        "hlt_reduction": l1_rate["rate_hz"] / hlt_rate["rate_hz"],
        "l1_menu": l1,
        "hlt_menu": hlt,
        "hlt_tag_jet_pt_gev": HLT_TAG_JET_PT_GEV,
    }
    (args.out / "menu.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--menu", action="store_true", help="calibrate the default menu")
    parser.add_argument("--reuse", action="store_true", help="--menu: reuse observables.npz")
    parser.add_argument(
        "--merge", type=Path, nargs="*", default=[], help="--menu: pool these observables.npz"
    )
    parser.add_argument("--mu", type=float, default=40.0, help="--menu: pileup mu")
    parser.add_argument(
        "--pileup-tilt",
        type=float,
        default=0.0,
        help="--menu: favour busy pileup (per GeV of scalar pT sum; weighted back)",
    )
    parser.add_argument("--l1-budget-hz", type=float, default=100e3)
    parser.add_argument("--hlt-budget-hz", type=float, default=1e3)
    parser.add_argument("--library", type=int, default=20_000, help="minimum-bias events")
    parser.add_argument("--blocks", type=int, default=200, help="lumi blocks of the ramp")
    parser.add_argument("--crossings", type=int, default=40_000, help="crossings per block")
    parser.add_argument("--reference", type=int, default=200_000, help="crossings for true rates")
    parser.add_argument("--target-hz", type=float, default=100e3, help="ETT path target")
    parser.add_argument("--settle", type=int, default=8, help="blocks left out of the check")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/trigger_rates"))
    args = parser.parse_args(argv)
    if args.menu:
        return run_menu(args)
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    library = minbias_ett(args.library, args.seed)
    library_s = time.perf_counter() - t0
    mus = np.linspace(40.0, 80.0, args.blocks)
    check = premix(library, 40.0, 400_000, rng)
    start = float(np.quantile(check, 1 - args.target_hz / CROSSING_HZ))
    controller = RateControlConfig(
        path="ett", target_hz=args.target_hz, initial_threshold=start
    ).build(node="bench")
    rows = []
    t1 = time.perf_counter()
    for lumi, mu in enumerate(mus, start=1):
        reference = premix(library, mu, args.reference, rng)
        held_t = controller.threshold
        values = premix(library, mu, args.crossings, rng)
        change = controller.update(
            lumi, values, np.ones(values.size), hz_per_event=CROSSING_HZ / values.size
        )
        rows.append(
            {
                "lumi": lumi,
                "mu": float(mu),
                "threshold_fixed": start,
                "threshold_controlled": held_t,
                "true_fixed_hz": CROSSING_HZ * float((reference > start).mean()),
                "true_controlled_hz": CROSSING_HZ * float((reference > held_t).mean()),
                "measured_controlled_hz": change.rate_hz,
                "measured_error_hz": change.error_hz,
            }
        )
    loop_s = time.perf_counter() - t1
    after = rows[args.settle :]
    ratio = np.array([r["true_controlled_hz"] for r in after]) / args.target_hz
    summary = {
        "library_events": int(library.size),
        "library_mean_ett_gev": float(library.mean()),
        "library_s": library_s,
        "loop_s": loop_s,
        "blocks": args.blocks,
        "crossings_per_block": args.crossings,
        "reference_crossings": args.reference,
        "target_hz": args.target_hz,
        "start_threshold_gev": start,
        "end_threshold_gev": controller.threshold,
        "settle_blocks": args.settle,
        "controlled_worst_deviation": float(np.abs(ratio - 1).max()),
        "controlled_mean_ratio": float(ratio.mean()),
        "controlled_std_ratio": float(ratio.std()),
        "fixed_rate_end_hz": rows[-1]["true_fixed_hz"],
        "fixed_rate_start_hz": rows[0]["true_fixed_hz"],
    }
    (args.out / "rows.json").write_text(json.dumps(rows, indent=1))
    _plot(rows, args, args.out / "rate_vs_lumi.png")
    print(json.dumps(summary, indent=2))
    return 0


def _plot(rows: list[dict[str, float]], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lumi = [r["lumi"] for r in rows]
    fig, (ax, ax_t) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    ax.plot(lumi, [r["true_fixed_hz"] for r in rows], label="fixed threshold")
    ax.plot(lumi, [r["true_controlled_hz"] for r in rows], label="controlled (true)")
    ax.errorbar(
        lumi,
        [r["measured_controlled_hz"] for r in rows],
        yerr=[r["measured_error_hz"] for r in rows],
        fmt=".",
        ms=2,
        alpha=0.4,
        label="controlled (measured in block)",
    )
    ax.axhspan(0.9 * args.target_hz, 1.1 * args.target_hz, color="g", alpha=0.2, label="±10%")
    ax.set_yscale("log")
    ax.set_ylabel("ETT path rate [Hz]")
    ax.legend(fontsize=8)
    ax2 = ax.twinx()
    ax2.plot(lumi, [r["mu"] for r in rows], "k:", lw=1)
    ax2.set_ylabel("mu (dotted)")
    ax_t.plot(lumi, [r["threshold_controlled"] for r in rows], label="controlled")
    ax_t.plot(lumi, [r["threshold_fixed"] for r in rows], label="fixed")
    ax_t.set_ylabel("ETT threshold [GeV]")
    ax_t.set_xlabel("lumi block")
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
