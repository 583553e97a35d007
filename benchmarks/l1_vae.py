"""L1 anomaly-detection physics: R_z vs sum mu^2 vs reconstruction loss on the L1 signals.

Scores every event of an independent background sample and of each signal sample with
the emulated firmware (mu, log sigma^2 bit-exact) and the float decoder, then reports per
signal and score: ROC AUC, TPR at FPR = 1e-5 and TPR at the calibrated rate (threshold
from ``firmware.calibrate`` on this background; flagged when it is extrapolated). Writes
one ROC PNG per signal.

The model is trained beforehand by ``trigfarm firmware train`` on simulated ``l1bkg``
(the default model's card holds the exact commands).

    python -m benchmarks.l1_vae --background BKG.h5 --signal a4l=A4L.h5 htautau=H.h5 ...
        [--model DIR] [--rate-hz 1000] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from firmware.calibrate import calibrate
from firmware.emulate import load_emulator
from firmware.inputs import input_mask, read_l1_objects
from firmware.model import DEFAULT_MODEL_DIR, L1Model, load_model
from firmware.scores import masked_mse, r_z, sum_mu2

SCORES = ("r_z", "sum_mu2", "reco_loss")


def score_events(model: L1Model, emulator, objects: np.ndarray) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    x = emulator.round_inputs(model.inputs(objects))
    mu, log_var = emulator.encode(x)
    return {
        "r_z": r_z(mu, log_var),
        "sum_mu2": sum_mu2(mu),
        "reco_loss": masked_mse(x, model.decode(mu), input_mask(objects)),
    }


def tpr_at(background: np.ndarray, signal: np.ndarray, threshold: float) -> float:
    del background
    return float((signal > threshold).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--background", nargs="+", required=True)
    parser.add_argument("--signal", nargs="+", required=True, help="NAME=cache.h5")
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--rate-hz", type=float, default=1000.0)
    parser.add_argument("--input-rate-hz", type=float, default=4e7)
    parser.add_argument("--out", default="l1_vae_roc")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = load_model(args.model)
    emulator = load_emulator(model)
    bkg_objects, _ = read_l1_objects(args.background)
    bkg = score_events(model, emulator, bkg_objects)
    n_bkg = len(bkg_objects)
    calibrations = {
        name: calibrate(bkg[name], rate_hz=args.rate_hz, input_rate_hz=args.input_rate_hz)
        for name in SCORES
    }
    # FPR 1e-5 needs >= 1e6 background events; with fewer, the cut at the highest
    # background score gives FPR < 1/N, reported as such.
    cut_1e5 = {name: float(np.max(bkg[name])) for name in SCORES}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, dict[str, float]]] = {}
    print(f"background: {n_bkg} events ({', '.join(args.background)}); model {model.path}")
    for name, calib in calibrations.items():
        print(f"  {name:9s} {calib.summary()}")
    print(f"{'signal':9s} {'n':>5s} {'score':9s} {'AUC':>6s} {'TPR@FPR<1/N':>12s} {'TPR@rate':>9s}")
    for spec in args.signal:
        label, _, path = spec.partition("=")
        sig_objects, _ = read_l1_objects(path)
        sig = score_events(model, emulator, sig_objects)
        fig, ax = plt.subplots(figsize=(4.5, 4), dpi=80)
        results[label] = {}
        for name in SCORES:
            y = np.r_[np.zeros(n_bkg), np.ones(len(sig_objects))]
            s = np.r_[bkg[name], sig[name]]
            s = np.nan_to_num(s, posinf=np.finfo(np.float64).max)
            auc = float(roc_auc_score(y, s))
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
            figures = {
                "auc": auc,
                "tpr_at_fpr_below_1_over_n": tpr_at(bkg[name], sig[name], cut_1e5[name]),
                "tpr_at_rate": tpr_at(bkg[name], sig[name], calibrations[name].threshold),
                "n_signal": len(sig_objects),
            }
            results[label][name] = figures
            print(
                f"{label:9s} {len(sig_objects):5d} {name:9s} {auc:6.3f} "
                f"{100 * figures['tpr_at_fpr_below_1_over_n']:11.2f}% "
                f"{100 * figures['tpr_at_rate']:8.2f}%"
            )
        ax.set_xscale("log")
        ax.set_xlim(1.0 / n_bkg, 1)
        ax.set_xlabel("background efficiency (FPR)")
        ax.set_ylabel("signal efficiency (TPR)")
        ax.set_title(f"L1 VAE: {label}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / f"roc_{label}.png")
        plt.close(fig)
    summary = {
        "n_background": n_bkg,
        "rate_hz": args.rate_hz,
        "input_rate_hz": args.input_rate_hz,
        "calibration": {k: v.to_dict() for k, v in calibrations.items()},
        "results": results,
    }
    print(f"ROC curves in {out_dir}/")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
