"""The HLT tagger at the LHCO-like stream's kinematics: anomaly AUC and score-mass correlation.

Evaluates checkpoints from ``trigfarm hlt train`` (qcd/w/top on fat jets of 1-2 TeV,
optionally with ``--disco``) on one split, ``val`` (for tuning) or ``test`` (to report):

- classifier: AUC of p_c / (p_c + p_qcd) for W and top jets against QCD jets of the
  training files' held-out rows (the jets, ``--max-jets`` and split the checkpoint was
  trained with);
- anomaly: for each score (−max softmax, entropy, Mahalanobis), the AUC of the event
  score, the larger of the two fat jets' scores as in ``nodes/hlt.py``, for the unseen
  signals ``wprime3p`` and ``wprime`` against QCD at pT-hat > 1 TeV; the event files are
  separate simulator runs per split (``EVENTS/{qcd,wprime3p,wprime}_{split}.h5``);
- decorrelation: Pearson r, Spearman ρ and dCor² between each score and the jet mass of
  the held-out QCD jets;
- reference: the AUC of the larger fat-jet mass as the event score, what mass alone
  separates.

The data and training commands are in benchmarks/RESULTS.md ("HLT tagger at the stream's
kinematics").
Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr

from models.anomaly import ANOMALY_SCORES, anomaly_score, distance_correlation
from models.checkpoint import Tagger, evaluate, load_checkpoint
from models.jet_inputs import JetInputs, jet_inputs
from models.particlenet_training import (
    LabelledJets,
    binary_metrics,
    class_metrics,
    load_labelled_jets,
    split_indices,
)
from stream.eventfile import read_cache

SIGNALS = ("wprime3p", "wprime")


def _event_jets(path: Path, limit: int) -> tuple[JetInputs, int]:
    """Both fat jets of the first ``limit`` events, flattened event-major."""
    batch = next(read_cache(path, chunk_size=limit, columns=("constituents", "n_constituents")))
    c, n = batch["constituents"], batch["n_constituents"]
    return jet_inputs(c.reshape(-1, *c.shape[2:]), n.reshape(-1)), len(batch)


def jet_scores(tagger: Tagger, inputs: JetInputs) -> dict[str, np.ndarray]:
    """Every anomaly score of every jet, from one pass of the network."""
    logits, embedding = (torch.from_numpy(a) for a in evaluate(tagger.model, inputs))
    return {
        name: anomaly_score(name, logits, embedding, tagger.mahalanobis).numpy()
        for name in ANOMALY_SCORES
    }


def event_scores(tagger: Tagger, inputs: JetInputs, n_events: int) -> dict[str, np.ndarray]:
    """Per score, the larger of each event's two jet scores (a missing jet counts as −inf)."""
    has = inputs.n_real > 0
    out = {}
    for name, s in jet_scores(tagger, inputs.select(has)).items():
        values = np.full(len(inputs), -np.inf)
        values[has] = s
        out[name] = values.reshape(n_events, 2).max(1)
    return out


def _held_out(data: LabelledJets, card: dict[str, Any], split: str) -> LabelledJets:
    config = card["training"]["config"]
    _, val_rows, test_rows = split_indices(
        len(data),
        val_fraction=config["val_fraction"],
        test_fraction=config["test_fraction"],
        seed=config["seed"],
    )
    return data.select(val_rows if split == "val" else test_rows)


def evaluate_checkpoint(
    tagger: Tagger,
    held_out: LabelledJets,
    events: dict[str, tuple[JetInputs, int]],
) -> dict[str, Any]:
    """Classifier AUCs, anomaly AUCs per score and signal, score-mass correlations."""
    probabilities, _ = tagger.predict(held_out.inputs)
    out: dict[str, Any] = {
        "classifier_auc": {
            name: m["auc"]
            for name, m in class_metrics(probabilities, held_out.labels, tagger.classes).items()
        }
    }
    qcd = held_out.select(np.flatnonzero(held_out.labels == 0))
    mass = qcd.inputs.jet[:, 3].astype(np.float64)
    per_jet = jet_scores(tagger, qcd.inputs)
    per_event = {name: event_scores(tagger, *inputs) for name, inputs in events.items()}
    for score in ANOMALY_SCORES:
        values = per_jet[score]
        row: dict[str, Any] = {
            "pearson_r_mass": float(pearsonr(values, mass)[0]),
            "spearman_rho_mass": float(spearmanr(values, mass)[0]),
            "dcor2_mass": float(
                distance_correlation(torch.from_numpy(values).double(), torch.from_numpy(mass))
            ),
        }
        for signal in SIGNALS:
            row[f"auc_{signal}"] = binary_metrics(
                per_event[signal][score], per_event["qcd"][score]
            )["auc"]
        out[score] = row
    out["n_qcd_jets"] = len(qcd)
    out["n_events"] = {name: n for name, (_, n) in events.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data_dir = Path("/tmp/hlt-hi")
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument(
        "--data",
        nargs=3,
        type=Path,
        default=[data_dir / f"{n}.h5" for n in ("qcd", "wjet", "ttbar")],
    )
    parser.add_argument("--max-jets", type=int, default=None, help="Per class, as trained.")
    parser.add_argument("--events-dir", type=Path, default=data_dir)
    parser.add_argument("--events", type=int, default=4096, help="Events per event file.")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    events = {
        name: _event_jets(args.events_dir / f"{name}_{args.split}.h5", args.events)
        for name in ("qcd", *SIGNALS)
    }
    loaded: dict[tuple[int, str], LabelledJets] = {}
    heavier = {name: inputs.jet[:, 3].reshape(n, 2).max(1) for name, (inputs, n) in events.items()}
    mass_only = {s: binary_metrics(heavier[s], heavier["qcd"])["auc"] for s in SIGNALS}
    print(
        "mass only (larger fat-jet mass): "
        + ", ".join(f"AUC {k} {v:.3f}" for k, v in mass_only.items())
    )
    results: dict[str, Any] = {"split": args.split, "mass_only_auc": mass_only, "checkpoints": {}}
    header = "checkpoint                 disco  score        AUC w3p  AUC w'  r(mass)  rho(mass)"
    print(header + "  dCor2   AUC top  AUC W")
    for path in args.checkpoints:
        tagger = load_checkpoint(path)
        card = dict(tagger.card)
        config = card["training"]["config"]
        seed, jets = int(config["seed"]), str(card["training"]["jets"])
        if (seed, jets) not in loaded:
            loaded[seed, jets] = load_labelled_jets(
                args.data, tagger.classes, jets=jets, max_per_class=args.max_jets, seed=seed
            )
        held_out = _held_out(loaded[seed, jets], card, args.split)
        figures = evaluate_checkpoint(tagger, held_out, events)
        figures["disco_lambda"] = config.get("disco_lambda", 0.0)
        figures["seed"] = seed
        results["checkpoints"][str(path)] = figures
        auc = figures["classifier_auc"]
        for score in ANOMALY_SCORES:
            f = figures[score]
            print(
                f"{path.name:26s} {figures['disco_lambda']:5g}  {score:11s}  "
                f"{f['auc_wprime3p']:.3f}    {f['auc_wprime']:.3f}  {f['pearson_r_mass']:+.3f}"
                f"   {f['spearman_rho_mass']:+.3f}     {f['dcor2_mass']:.3f}   "
                f"{auc.get('top', float('nan')):.3f}    {auc.get('w', float('nan')):.3f}",
                flush=True,
            )
    print(json.dumps(results, default=float))


if __name__ == "__main__":
    main()
