"""``trigfarm analyze cwola|cathode|anode``: anomaly searches on an archive of flows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def analyze() -> None:
    """Find anomalies from the archived flows (and, optionally, stored events)."""


def _options(function: Any) -> Any:
    options = [
        click.option(
            "--archive",
            "archive_dir",
            required=True,
            type=click.Path(exists=True, file_okay=False),
            help="Archive folder (with index.sqlite).",
        ),
        click.option(
            "--test",
            "test_specs",
            required=True,
            multiple=True,
            help="Labelled test events: a trigfarm .h5 cache or "
            "'lhco-features:<paths>'; repeatable. Never used for training.",
        ),
        click.option(
            "--events",
            "events_specs",
            multiple=True,
            help="Stored events (e.g. the archive's events/*.h5): CATHODE uses "
            "them as the data side (hybrid); the bump hunt runs on them.",
        ),
        click.option(
            "--out",
            "out_dir",
            required=True,
            type=click.Path(file_okay=False),
            help="Folder for summary.json and the PNG plots.",
        ),
        click.option(
            "--signal-region",
            nargs=2,
            type=float,
            default=(3300.0, 3700.0),
            help="Signal-region mjj window [GeV].",
        ),
        click.option(
            "--samples",
            type=click.IntRange(min=100),
            default=40_000,
            help="Flow samples per class.",
        ),
        click.option(
            "--ensemble", type=click.IntRange(min=1), default=3, help="Classifiers in the ensemble."
        ),
        click.option(
            "--epochs", type=click.IntRange(min=1), default=20, help="Epochs per classifier."
        ),
        click.option("--seed", type=int, default=0, help="Seed of sampling and training."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _run(
    method: str,
    *,
    archive_dir: str,
    test_specs: tuple[str, ...],
    events_specs: tuple[str, ...],
    out_dir: str,
    signal_region: tuple[float, float],
    samples: int,
    ensemble: int,
    epochs: int,
    seed: int,
) -> None:
    # Imported here so that other trigfarm commands do not pay for torch at start-up.
    from analysis.classifier import ClassifierConfig
    from analysis.methods import SearchConfig
    from analysis.report import analyze as run_analysis

    config = SearchConfig(
        signal_region_gev=signal_region,
        n_samples=samples,
        classifier=ClassifierConfig(n_models=ensemble, epochs=epochs, seed=seed),
        seed=seed,
    )
    summary = run_analysis(
        method,
        archive_dir,
        list(test_specs),
        out_dir,
        events_specs=list(events_specs),
        config=config,
    )
    for name, figures in summary["methods"].items():
        click.echo(
            f"{name}: max SIC {figures['max_sic']:.2f}, SIC at eps_S=0.2 "
            f"{figures['sic_at_eff_s_0.2']:.2f}, AUC {figures['auc']:.3f} "
            f"({figures['n_test_signal']} signal / {figures['n_test_background']} background "
            "test events in the SR)"
        )
        for bump in figures["bump_hunt"]:
            click.echo(
                f"  bump hunt eps={bump['efficiency']:g}: observed {bump['observed_sr']}, "
                f"fit {bump['expected_sr']:.1f}, local Z {bump['local_significance']:.2f}"
            )
    click.echo(f"wrote {Path(out_dir) / 'summary.json'}")
    click.echo(
        json.dumps(
            {"method": summary["method"], **summary["methods"][summary["method"]]}, default=float
        )
    )


@analyze.command()
@_options
def cwola(**kw: Any) -> None:
    """CWoLa from flows: all-data flow samples at SR vs sideband mjj."""
    _run("cwola", **kw)


@analyze.command()
@_options
def cathode(**kw: Any) -> None:
    """CATHODE: sideband flow interpolated into the SR vs data (flow samples or --events)."""
    _run("cathode", **kw)


@analyze.command()
@_options
def anode(**kw: Any) -> None:
    """ANODE: the likelihood ratio of the all-data and sideband flows."""
    _run("anode", **kw)
