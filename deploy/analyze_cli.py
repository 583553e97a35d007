"""``trigfarm analyze cwola|cathode|anode|anode-interpolated``: anomaly searches on an
archive of flows."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError


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
            multiple=True,
            help="Labelled test events: a trigfarm .h5 cache or "
            "'lhco-features:<paths>'; repeatable. Never used for training. Required "
            "unless --follow.",
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
        click.option(
            "--windows",
            nargs=4,
            type=float,
            default=None,
            help="Scanned mjj windows: START STOP WIDTH STEP [GeV] (sliding windows; default "
            "analysis.scan.SLIDING_WINDOWS_GEV, 2900 6000 400 200).",
        ),
        click.option(
            "--global-method",
            type=click.Choice(["trials", "toys"]),
            default="trials",
            help="Global p-value: Bonferroni trials factor, or background-only toys.",
        ),
        click.option(
            "--toys", type=click.IntRange(min=1), default=200, help="Toys for --global-method toys."
        ),
        click.option(
            "--spurious-fraction",
            type=click.FloatRange(min=0, max=1, max_open=True),
            default=None,
            help="Sculpting of the method's cut, as a fraction of the window's background, "
            "added to the fit's uncertainty after a cut (default: the method's value "
            "measured on no-signal controls, analysis.spurious).",
        ),
        click.option(
            "--follow",
            is_flag=True,
            help="Live: re-run the scan on the archive's stored events each time new flow "
            "snapshots arrive (while the farm runs).",
        ),
        click.option(
            "--poll-s", type=click.FloatRange(min=0), default=5.0, help="--follow: poll period."
        ),
        click.option(
            "--max-updates",
            type=click.IntRange(min=1),
            default=None,
            help="--follow: stop after this many scans (default: until --timeout-s or Ctrl-C).",
        ),
        click.option(
            "--timeout-s",
            type=click.FloatRange(min=0),
            default=None,
            help="--follow: stop after this many seconds.",
        ),
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
    windows: tuple[float, float, float, float] | None,
    global_method: str,
    toys: int,
    spurious_fraction: float | None,
    follow: bool,
    poll_s: float,
    max_updates: int | None,
    timeout_s: float | None,
) -> None:
    # Imported here so that other trigfarm commands do not pay for torch at start-up.
    from analysis.classifier import ClassifierConfig
    from analysis.data import Events
    from analysis.methods import SearchConfig
    from analysis.report import analyze as run_analysis
    from analysis.scan import SLIDING_WINDOWS_GEV, ScanConfig, sliding_windows
    from analysis.spurious import SPURIOUS_FRACTIONS
    from deploy.topology import config_error
    from simulator.replay import read_features

    config = SearchConfig(
        signal_region_gev=signal_region,
        n_samples=samples,
        classifier=ClassifierConfig(n_models=ensemble, epochs=epochs, seed=seed),
        seed=seed,
    )
    try:
        scanned = sliding_windows(*(windows or SLIDING_WINDOWS_GEV))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--windows") from exc
    if spurious_fraction is not None:
        fraction, origin = spurious_fraction, "given"
    elif method in SPURIOUS_FRACTIONS:
        fraction, origin = (
            SPURIOUS_FRACTIONS[method],
            "measured on no-signal controls, analysis.spurious",
        )
    else:
        fraction, origin = 0.0, "not measured for this method: its cut is trusted not to sculpt"
    scan_values: dict[str, Any] = {
        "windows_gev": scanned,
        "global_method": global_method,
        "n_toys": toys,
        "seed": seed,
        "spurious_fraction": fraction,
    }
    try:
        scan_config = ScanConfig(**scan_values)
    except ValidationError as exc:
        problem = config_error(exc, scan_values, "scan", ScanConfig)
        raise click.BadParameter(str(problem), param_hint="--windows") from None
    click.echo(
        f"spurious-signal fraction after a cut: {scan_config.spurious_fraction:g} ({origin})"
    )
    if follow:
        _follow(method, archive_dir, out_dir, config, scan_config, poll_s, max_updates, timeout_s)
        return
    if not test_specs:
        raise click.UsageError("--test is required (unless --follow)")
    summary = run_analysis(
        method,
        archive_dir,
        Events(*read_features(list(test_specs))),
        out_dir,
        stored=Events(*read_features(list(events_specs))) if events_specs else None,
        config=config,
        scan_config=scan_config,
    )
    for name, figures in summary["methods"].items():
        sic_02 = figures["sic_at_eff_s_0.2"]
        click.echo(
            f"{name}: max SIC {figures['max_sic']:.2f}, SIC at eps_S=0.2 "
            + (
                f"{sic_02:.2f}"
                if math.isfinite(sic_02)
                else f"n/a ({figures['background_events_at_eff_s_0.2']} background events left)"
            )
            + f", AUC {figures['auc']:.3f} "
            f"({figures['n_test_signal']} signal / {figures['n_test_background']} background "
            "test events in the SR)"
        )
    click.echo(_scan_line(summary["scan"]))
    click.echo(f"wrote {Path(out_dir) / 'summary.json'}")
    click.echo(
        json.dumps(
            {
                "method": summary["method"],
                **summary["methods"][summary["method"]],
                "scan": {k: v for k, v in summary["scan"].items() if k != "tests"},
            },
            default=float,
        )
    )


def _scan_line(scan: dict[str, Any]) -> str:
    window = scan["best_window_gev"]
    where = (
        f"smallest local p {scan['min_local_pvalue']:.2g} (local Z "
        f"{scan['max_local_significance']:.2f}) in {window[0]:.0f}-{window[1]:.0f} GeV at "
        f"eps={scan['best_efficiency']:g}"
        if window
        else "no valid fit"
    )
    return (
        f"scan of {len(scan['windows_gev'])} windows x {len(scan['efficiencies'])} working "
        f"points on {scan.get('on', 'the events')} ({scan['events']} in the fit range): {where}; "
        f"global p {scan['global_pvalue']:.3g}, global Z {scan['global_significance']:.2f} "
        f"({scan['global_method_text']})"
    )


def _follow(
    method: str,
    archive_dir: str,
    out_dir: str,
    config: Any,
    scan_config: Any,
    poll_s: float,
    max_updates: int | None,
    timeout_s: float | None,
) -> None:
    from analysis.live import follow, live_scan, plot_history

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    updates = []
    analyse = live_scan(method, config, scan_config)
    for update in follow(
        archive_dir, analyse, poll_s=poll_s, max_updates=max_updates, timeout_s=timeout_s
    ):
        updates.append(update)
        scan = update.scan.summary()
        click.echo(
            f"update {update.update} at {update.elapsed_s:.0f} s: flows saw "
            f"{update.events_seen} events, {update.events_stored} stored; "
            + _scan_line({**scan, "on": "stored events"})
        )
        zs = update.local_z_by_window()
        click.echo(
            "  local Z by window: "
            + ", ".join(f"{w[0]:.0f}-{w[1]:.0f}: {z:+.1f}" for w, z in sorted(zs.items()))
        )
        plot_history(updates, out / "live_significance.png", title=f"{method}, live")
        history = [
            {
                "update": u.update,
                "events_seen": u.events_seen,
                "events_stored": u.events_stored,
                "elapsed_s": u.elapsed_s,
                "local_z_by_window": {
                    f"{w[0]:.0f}-{w[1]:.0f}": z for w, z in sorted(u.local_z_by_window().items())
                },
                "global_pvalue": u.scan.global_pvalue,
                "global_significance": u.scan.global_significance,
                "global_method": u.scan.method_text(),
            }
            for u in updates
        ]
        (out / "live.json").write_text(json.dumps(history, indent=2, default=float))
    click.echo(f"{len(updates)} updates; wrote {out / 'live.json'}")


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
    """ANODE: the likelihood ratio of the data (signal-region, out of fold, or all-data)
    and sideband flows."""
    _run("anode", **kw)


@analyze.command()
@_options
def anode_interpolated(**kw: Any) -> None:
    """ANODE in every window from the all-data flow alone: its background density at the
    window's centre interpolated from the two sidebands."""
    _run("anode_interpolated", **kw)
