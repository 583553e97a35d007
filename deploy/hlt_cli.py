"""``trigfarm hlt``: train the HLT's ParticleNet tagger and write a checkpoint with its card."""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path
from typing import get_args

import click
import torch

from models.anomaly import ANOMALY_SCORES, LogitScore
from models.checkpoint import save_checkpoint
from models.jet_inputs import FEATURE_NAMES
from models.particlenet import VARIANTS
from models.particlenet_training import (
    JET_CHOICES,
    BatchOrder,
    EpochReport,
    TrainConfig,
    load_labelled_jets,
    plot_rocs,
    train_tagger,
)


@click.group()
def hlt() -> None:
    """The HLT tagger: training and checkpoints."""


def _echo_epoch(report: EpochReport) -> None:
    aucs = " ".join(f"auc[{k}]={v:.4f}" for k, v in report.val_auc.items())
    click.echo(
        f"epoch {report.epoch:3d}  train_loss {report.train_loss:.4f}  "
        f"val_loss {report.val_loss:.4f}  val_acc {report.val_accuracy:.4f}  {aucs}  "
        f"({report.jets_per_s:,.0f} jets/s, {report.elapsed_s:.0f} s)"
    )


@hlt.command(context_settings={"show_default": True})
@click.option(
    "--data",
    "data",
    multiple=True,
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="One simulator cache per class (in --classes order), or one labelled .npz.",
)
@click.option(
    "--classes",
    default="qcd,w,top",
    envvar="TRIGFARM_HLT_CLASSES",
    help="Class names, background first (env TRIGFARM_HLT_CLASSES).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    envvar="TRIGFARM_HLT_OUT",
    help="Checkpoint directory to write (env TRIGFARM_HLT_OUT).",
)
@click.option("--variant", type=click.Choice(sorted(VARIANTS)), default="particlenet-lite")
@click.option("--epochs", type=click.IntRange(min=1), default=10)
@click.option("--batch-size", type=click.IntRange(min=2), default=256)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=3e-3)
@click.option("--time-budget-s", type=click.FloatRange(min=0), default=0.0, help="0: none.")
@click.option("--max-jets", type=click.IntRange(min=1), default=None, help="Per class.")
@click.option("--jets", type=click.Choice(JET_CHOICES), default="heavier", help="From caches.")
@click.option("--n-particles", type=click.IntRange(min=1), default=128)
@click.option("--val-fraction", type=click.FloatRange(0, 0.5), default=0.1)
@click.option("--test-fraction", type=click.FloatRange(0, 0.5), default=0.2)
@click.option("--seed", type=int, default=0, help="Split, initialisation and batch order.")
@click.option("--mass-decorrelate", is_flag=True, help="Resample classes to one mass histogram.")
@click.option(
    "--disco",
    "disco_lambda",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Weight λ of the DisCo loss term: dCor² of --disco-score and jet mass on the "
    "background jets of each batch (0: off).",
)
@click.option(
    "--batch-order",
    type=click.Choice(get_args(BatchOrder)),
    default="random",
    help="Random jets per batch, or jets of similar multiplicity (less padding, worse "
    "tagging; how the committed default tagger was trained).",
)
@click.option(
    "--disco-score",
    type=click.Choice(get_args(LogitScore)),
    default="max_softmax",
    help="The anomaly score --disco decorrelates from the jet mass.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    envvar="TRIGFARM_TORCH_THREADS",
    help="Torch threads (env TRIGFARM_TORCH_THREADS).",
)
@click.option("--force", is_flag=True, help="Write into an existing checkpoint directory.")
def train(
    data: tuple[Path, ...],
    classes: str,
    out: Path,
    variant: str,
    epochs: int,
    batch_size: int,
    lr: float,
    time_budget_s: float,
    max_jets: int | None,
    jets: str,
    n_particles: int,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    mass_decorrelate: bool,
    disco_lambda: float,
    disco_score: str,
    batch_order: str,
    threads: int,
    force: bool,
) -> None:
    """Train ParticleNet on labelled jets; write model.pt, model.json and ROC PNGs to OUT.

    Caches give each event's heavier fat jet (--jets both: both jets), labelled by the
    file's class. The jets are split into train/validation/test by --seed; the model card
    records the data, the command, the validation history and the test figures.
    """
    names = tuple(c.strip() for c in classes.split(",") if c.strip())
    if len(names) < 2:
        raise click.BadParameter("need at least two classes", param_hint="--classes")
    if (out / "model.pt").exists() and not force:
        msg = f"{out} already holds a checkpoint; use --force to replace it"
        raise click.UsageError(msg)
    torch.set_num_threads(threads)
    command = shlex.join(["trigfarm", *sys.argv[1:]])
    t0 = time.perf_counter()
    try:
        jets_data = load_labelled_jets(
            data, names, n_particles=n_particles, jets=jets, max_per_class=max_jets, seed=seed
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--data") from exc
    click.echo(
        f"loaded {len(jets_data)} jets {jets_data.counts()} in {time.perf_counter() - t0:.1f} s"
    )
    architecture = VARIANTS[variant].with_classes(len(names), n_particles=n_particles)
    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        time_budget_s=time_budget_s,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        mass_decorrelate=mass_decorrelate,
        disco_lambda=disco_lambda,
        disco_score=disco_score,  # type: ignore[arg-type]
        batch_order=batch_order,  # type: ignore[arg-type]
    )
    result = train_tagger(jets_data, architecture, config, progress=_echo_epoch)
    card = {
        "name": out.name,
        "variant": variant,
        "input_features": list(FEATURE_NAMES),
        "anomaly_scores": list(ANOMALY_SCORES),
        "training": {
            "command": command,
            "data": list(jets_data.sources),
            "jets": jets,
            "jets_per_class": jets_data.counts(),
            "n_train": result.extra["n_train"],
            "n_val": result.extra["n_val"],
            "n_test": result.extra["n_test"],
            "seed": seed,
            "epochs_run": len(result.history),
            "train_s": round(result.train_s, 1),
            "stopped_by_time_budget": result.stopped_by_budget,
            "threads": threads,
            "torch": torch.__version__,
            "config": dataclasses.asdict(config),
        },
        "history": [
            {
                "epoch": r.epoch,
                "train_loss": r.train_loss,
                "val_loss": r.val_loss,
                "val_accuracy": r.val_accuracy,
                "val_auc": r.val_auc,
            }
            for r in result.history
        ],
        "test": result.test,
    }
    save_checkpoint(out, result.tagger.model, result.tagger.mahalanobis, names, card)
    pngs = plot_rocs(result.test_scores, result.test_labels, names, out)
    click.echo(f"test: accuracy {result.test['accuracy']:.4f}")
    for name, figures in result.test["per_class"].items():
        click.echo(
            f"  {name} vs {names[0]}: AUC {figures['auc']:.4f}, 1/eps_B at eps_S=0.5 "
            f"{figures['rejection_at_50']:.1f}, at 0.3 {figures['rejection_at_30']:.1f}"
        )
    click.echo(f"wrote {out}/model.pt, model.json and {len(pngs)} ROC plot(s)")
    click.echo(json.dumps({"out": str(out), "test": result.test}, default=float))
