"""ParticleNet for the HLT: accuracy on real and simulated jets, anomaly AUC, inference speed.

Sections (each can be skipped):

1. ``tau``: the real Delphes tau-vs-QCD jets (``../shared/data/tau-vs-qcd``), a balanced
   seeded subset split 70/10/20 by seed; ParticleNet-Lite and ParticleNet each trained
   within a wall-clock budget on one CPU thread; test AUC and 1/ε_B at ε_S = 0.5, 0.3.
2. ``top``: simulator top vs QCD jets (both fat jets of ttbar and of QCD at pT-hat > 400
   GeV); the same figures beside the top-tagging landscape's published ParticleNet
   (AUC 0.9858, 1/ε_B ≈ 1615 at ε_S = 0.3), which used different (Delphes) jets.
3. ``anomaly``: the three classifier scores of a qcd/w/top tagger on events of the
   unseen three-prong W' (``wprime3p``) against QCD, event score = max over the two fat
   jets, as the HLT computes it; and the score-mass correlation on QCD jets with and
   without mass decorrelation.
4. ``speed``: jets/s and p50/p99 batch latency at batch sizes 1, 64, 512 for both
   variants, ours against weaver-core's ``weaver.nn.model.ParticleNet.ParticleNet`` with
   the same configuration and the same inputs, alternating trials.

The simulator files come from ``trigfarm simulate`` (see ``--help``; the commands are in
benchmarks/RESULTS.md). Prints its figures and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.checkpoint import load_checkpoint
from models.jet_inputs import JetInputs, jet_inputs
from models.particlenet import PARTICLENET, PARTICLENET_LITE, ParticleNet, ParticleNetConfig
from models.particlenet_training import (
    TrainConfig,
    binary_metrics,
    load_labelled_jets,
    train_tagger,
)
from stream.eventfile import read_cache

ROOT = Path(__file__).resolve().parents[1]
TAU = ROOT.parent / "shared" / "data" / "tau-vs-qcd" / "tau_vs_qcd_constituents.npz"
LANDSCAPE = {"auc": 0.9858, "rejection_at_30": 1615.0}


def _train(data, config: ParticleNetConfig, budget_s: float, batch_size: int, **kw: Any) -> dict:  # type: ignore[no-untyped-def]
    train_config = TrainConfig(
        epochs=kw.pop("epochs", 200), batch_size=batch_size, time_budget_s=budget_s, seed=0, **kw
    )
    result = train_tagger(
        data,
        config,
        train_config,
        progress=lambda r: print(
            f"  [{config.name}] epoch {r.epoch} val_auc {r.val_auc} "
            f"({r.jets_per_s:.0f} jets/s, {r.elapsed_s:.0f} s)",
            flush=True,
        ),
    )
    return {"result": result, "epochs": len(result.history), "train_s": round(result.train_s, 1)}


def section_tau(args: argparse.Namespace) -> dict:
    if not TAU.exists():
        print(f"tau: {TAU} missing, skipped")
        return {"skipped": "no data"}
    data = load_labelled_jets([TAU], ("qcd", "tau"), max_per_class=args.tau_per_class, seed=0)
    print(f"tau-vs-qcd: {data.counts()} jets (balanced seeded subset), split 70/10/20")
    out = {}
    for config, batch in ((PARTICLENET_LITE, 256), (PARTICLENET, 128)):
        run = _train(data, config, args.budget_s, batch)
        figures = run["result"].test["per_class"]["tau"]
        out[config.name] = {
            **{k: v for k, v in figures.items()},
            "epochs": run["epochs"],
            "train_s": run["train_s"],
            "n_train": run["result"].extra["n_train"],
        }
        print(
            f"tau {config.name}: test AUC {figures['auc']:.4f}, 1/eps_B @0.5 "
            f"{figures['rejection_at_50']:.1f}, @0.3 {figures['rejection_at_30']:.1f} "
            f"({run['epochs']} epochs, {run['train_s']:.0f} s, {figures['n_signal']} tau / "
            f"{figures['n_background']} qcd test jets)",
            flush=True,
        )
    return out


def section_top(args: argparse.Namespace) -> dict:
    data = load_labelled_jets(
        [args.qcd, args.ttbar], ("qcd", "top"), jets="both", max_per_class=args.top_per_class
    )
    print(f"simulator top vs qcd: {data.counts()} jets (both fat jets), split 70/10/20")
    out: dict[str, Any] = {"landscape_particlenet": LANDSCAPE}
    for config, batch in ((PARTICLENET_LITE, 256), (PARTICLENET, 128)):
        if config is PARTICLENET and args.top_lite_only:
            continue
        run = _train(data, config, args.budget_s, batch)
        figures = run["result"].test["per_class"]["top"]
        out[config.name] = {**figures, "epochs": run["epochs"], "train_s": run["train_s"]}
        print(
            f"top {config.name}: test AUC {figures['auc']:.4f} (landscape {LANDSCAPE['auc']}), "
            f"1/eps_B @0.3 {figures['rejection_at_30']:.1f} (landscape "
            f"{LANDSCAPE['rejection_at_30']:.0f}), @0.5 {figures['rejection_at_50']:.1f}",
            flush=True,
        )
    return out


def _event_jets(path: Path, limit: int) -> tuple[JetInputs, int]:
    batch = next(read_cache(path, chunk_size=limit, columns=("constituents", "n_constituents")))
    c, n = batch["constituents"], batch["n_constituents"]
    return jet_inputs(c.reshape(-1, *c.shape[2:]), n.reshape(-1)), len(batch)


def _event_scores(tagger, inputs: JetInputs, n_events: int, score: str) -> np.ndarray:  # type: ignore[no-untyped-def]
    has = inputs.n_real > 0
    values = np.full(len(inputs), -np.inf)
    _, s = tagger.predict(inputs.select(has), score=score)
    values[has] = s
    return values.reshape(n_events, 2).max(1)


def section_anomaly(args: argparse.Namespace) -> dict:
    tagger = load_checkpoint(args.checkpoint)
    print(f"anomaly: tagger {args.checkpoint} classes {tagger.classes}")
    signal, n_sig = _event_jets(args.wprime3p, args.anomaly_events)
    out: dict[str, Any] = {}
    for label, path in (("qcd_pthat1000", args.qcd1tev), ("qcd_pthat400", args.qcd)):
        background, n_bkg = _event_jets(path, args.anomaly_events)
        for score in ("max_softmax", "entropy", "mahalanobis"):
            s = _event_scores(tagger, signal, n_sig, score)
            b = _event_scores(tagger, background, n_bkg, score)
            figures = binary_metrics(s, b)
            out[f"{score}_vs_{label}"] = figures
            print(
                f"anomaly {score:11s} wprime3p vs {label}: AUC {figures['auc']:.4f} "
                f"({n_sig} vs {n_bkg} events)",
                flush=True,
            )
    out["decorrelation"] = _decorrelation(args)
    return out


def _decorrelation(args: argparse.Namespace) -> dict:
    """Score-mass correlation on QCD test jets for a qcd/w/top tagger trained with and
    without resampling the classes to a common mass histogram (equal budgets)."""
    from scipy.stats import pearsonr, spearmanr

    data = load_labelled_jets(
        [args.qcd, args.wjet, args.ttbar], ("qcd", "w", "top"), max_per_class=args.decor_per_class
    )
    signal, n_sig = _event_jets(args.wprime3p, args.anomaly_events)
    background, n_bkg = _event_jets(args.qcd1tev, args.anomaly_events)
    out = {}
    for decorrelate in (False, True):
        run = _train(data, PARTICLENET_LITE, args.decor_budget_s, 256, mass_decorrelate=decorrelate)
        result = run["result"]
        tagger = result.tagger
        test = data.select(result.extra["test_rows"])
        qcd = test.select(np.flatnonzero(test.labels == 0))
        row: dict[str, Any] = {"epochs": run["epochs"], "test": result.test["per_class"]}
        for score in ("max_softmax", "mahalanobis"):
            _, values = tagger.predict(qcd.inputs, score=score)
            mass = qcd.inputs.jet[:, 3]
            row[f"{score}_pearson_r_mass"] = float(pearsonr(values, mass)[0])
            row[f"{score}_spearman_rho_mass"] = float(spearmanr(values, mass)[0])
            s = _event_scores(tagger, signal, n_sig, score)
            b = _event_scores(tagger, background, n_bkg, score)
            row[f"{score}_auc_wprime3p_vs_qcd1tev"] = binary_metrics(s, b)["auc"]
        key = "mass_decorrelated" if decorrelate else "nominal"
        out[key] = row
        print(f"decorrelation {key}: {json.dumps(row, default=float)}", flush=True)
    return out


def _weaver(config: ParticleNetConfig) -> torch.nn.Module | None:
    try:
        from weaver.nn.model.ParticleNet import ParticleNet as WeaverParticleNet
    except ImportError:
        return None
    import logging

    logging.getLogger("weaver").setLevel(logging.WARNING)
    return WeaverParticleNet(
        input_dims=config.n_features,
        num_classes=config.n_classes,
        conv_params=[(config.k, c) for c in config.conv_channels],
        fc_params=[(config.fc_channels, config.dropout)],
        use_fusion=False,
        trim=False,
    ).eval()


def _time_batches(fn, batches: list[tuple[torch.Tensor, ...]]) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    with torch.inference_mode():
        for batch in batches:
            t0 = time.perf_counter()
            fn(*batch)
            out.append(time.perf_counter() - t0)
    return out


def section_speed(args: argparse.Namespace) -> dict:
    qcd, _ = _event_jets(args.qcd, 2048)
    top, _ = _event_jets(args.ttbar, 2048)
    pool = JetInputs.concat([qcd, top])
    pool = pool.select(np.flatnonzero(pool.n_real > 0))
    rng = np.random.default_rng(0)
    print(
        f"speed: {len(pool)} simulator jets, padded to 128, median {np.median(pool.n_real):.0f} "
        f"particles; {torch.get_num_threads()} torch thread(s)"
    )
    out: dict[str, Any] = {"weaver_core": None}
    for config in (PARTICLENET_LITE, PARTICLENET):
        ours = ParticleNet(config).eval()
        weaver = _weaver(config)
        if weaver is None and out["weaver_core"] is None:
            print("  weaver-core is MISSING: pip install --no-deps weaver-core==0.5.3")
            out["weaver_core"] = "missing"
        elif weaver is not None:
            out["weaver_core"] = "0.5.3"

        def run_ours(points, features, mask, model=ours):  # type: ignore[no-untyped-def]
            width = max(int(mask.sum(1).max()), 1)
            return torch.softmax(model(points[:, :width], features[:, :width], mask[:, :width]), 1)

        def run_weaver(points, features, mask, model=weaver, k=config.k):  # type: ignore[no-untyped-def]
            # weaver's kNN needs at least k + 1 slots, so its own trimming fails on short
            # jets; trim here as ours does, keeping k + 1 slots.
            width = min(max(int(mask.sum(1).max()), k + 1), mask.shape[1])
            points, features, mask = points[:, :width], features[:, :width], mask[:, :width]
            return torch.softmax(
                model(points.transpose(1, 2), features.transpose(1, 2), mask.unsqueeze(1).float()),
                1,
            )

        for batch_size in (1, 64, 512):
            n_batches = {1: args.speed_single, 64: 24, 512: 4}[batch_size]
            if config is PARTICLENET and batch_size == 512:
                n_batches = 3
            batches = []
            for _ in range(n_batches):
                rows = rng.choice(len(pool), batch_size, replace=False)
                batches.append(pool.select(rows).to_torch())
            warm = (batches * 3)[:3]
            _time_batches(run_ours, warm)
            times: dict[str, list[float]] = {"ours": []}
            if weaver is not None:
                _time_batches(run_weaver, warm)
                times["weaver"] = []
            for trial in range(args.trials):
                del trial
                times["ours"] += _time_batches(run_ours, batches)
                if weaver is not None:
                    times["weaver"] += _time_batches(run_weaver, batches)
            row = {}
            for name, values in times.items():
                arr = np.array(values)
                row[name] = {
                    "jets_per_s": batch_size * len(arr) / arr.sum(),
                    "p50_ms": float(np.percentile(arr, 50) * 1e3),
                    "p99_ms": float(np.percentile(arr, 99) * 1e3),
                }
            if "weaver" in row:
                row["ratio"] = row["ours"]["jets_per_s"] / row["weaver"]["jets_per_s"]
            out[f"{config.name}_bs{batch_size}"] = row
            text = "  ".join(
                f"{k} {v['jets_per_s']:,.0f} jets/s "
                f"p50 {v['p50_ms']:.2f} ms p99 {v['p99_ms']:.2f} ms"
                for k, v in row.items()
                if isinstance(v, dict)
            )
            ratio = f"  ratio {row['ratio']:.2f}" if "ratio" in row else ""
            print(f"speed {config.name} bs={batch_size}: {text}{ratio}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = Path("/tmp/hlt-data")
    parser.add_argument("--sections", default="tau,top,anomaly,speed")
    parser.add_argument("--budget-s", type=float, default=480.0, help="Training budget per model.")
    parser.add_argument("--decor-budget-s", type=float, default=150.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tau-per-class", type=int, default=15000)
    parser.add_argument("--top-per-class", type=int, default=24000)
    parser.add_argument("--top-lite-only", action="store_true")
    parser.add_argument("--decor-per-class", type=int, default=4000)
    parser.add_argument("--anomaly-events", type=int, default=3000)
    parser.add_argument("--speed-single", type=int, default=200, help="Batches at size 1.")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "default")
    for name in ("qcd", "wjet", "ttbar", "wprime3p", "qcd1tev"):
        parser.add_argument(f"--{name}", type=Path, default=data / f"{name}.h5")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sections = {"tau": section_tau, "top": section_top, "anomaly": section_anomaly}
    sections["speed"] = section_speed
    results: dict[str, Any] = {"threads": args.threads, "budget_s": args.budget_s}
    t0 = time.perf_counter()
    for name in args.sections.split(","):
        results[name] = sections[name](args)
    results["elapsed_s"] = round(time.perf_counter() - t0, 1)

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    print(json.dumps(clean(results), default=float))


if __name__ == "__main__":
    main()
