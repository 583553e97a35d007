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
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import awkward as ak
import numpy as np

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--library", type=int, default=20_000, help="minimum-bias events")
    parser.add_argument("--blocks", type=int, default=200, help="lumi blocks of the ramp")
    parser.add_argument("--crossings", type=int, default=40_000, help="crossings per block")
    parser.add_argument("--reference", type=int, default=200_000, help="crossings for true rates")
    parser.add_argument("--target-hz", type=float, default=100e3, help="ETT path target")
    parser.add_argument("--settle", type=int, default=8, help="blocks left out of the check")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/trigger_rates"))
    args = parser.parse_args(argv)
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
