"""Run a search end to end and report it: SIC and ROC on labelled test events, the bump
hunt, PNG plots and a JSON summary.

Test events are restricted to the signal region (where the searches are defined) and are
never used for training. The bump hunt runs on the stored events when given (they are the
data; flow-trained classifiers never saw them), with the method's measured spurious-signal
fraction in σ_b after a cut (``analysis.spurious``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from analysis import methods
from analysis.bumphunt import BumpResult, bump_hunt
from analysis.data import Events
from analysis.metrics import Roc, roc
from analysis.scan import FlowSets, ScanConfig, plot_pvalues, plot_spectra, scan, window_scorer
from analysis.spurious import SPURIOUS_FRACTIONS
from models.archive import Archive

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MethodResult:
    """One method's figures on the test events, and its bump hunt."""

    name: str
    roc: Roc
    bumps: tuple[BumpResult, ...] = ()

    def summary(self) -> dict[str, Any]:
        return {
            "max_sic": self.roc.max_sic(),
            "sic_at_eff_s_0.2": self.roc.sic_at(0.2),
            "background_events_at_eff_s_0.2": self.roc.background_at(0.2),
            "auc": self.roc.auc,
            "n_test_signal": self.roc.n_signal,
            "n_test_background": self.roc.n_background,
            "bump_hunt": [b.summary() for b in self.bumps],
        }


def score_method(
    name: str,
    models: methods.FlowModels | None,
    config: methods.SearchConfig,
    *,
    stored: Events | None = None,
    true_background: Events | None = None,
) -> Any:
    """A function features -> scores for the named method (trains what it needs)."""
    if name == "anode":
        assert models is not None
        return lambda f: methods.anode_scores(models, f)
    if name == "anode_interpolated":
        assert models is not None
        return lambda f: methods.anode_interpolated(models.all_data, f, config)
    if name == "cwola":
        assert models is not None
        model = methods.cwola_flows(models, config)
    elif name in ("cathode", "cathode_hybrid"):
        assert models is not None
        model = methods.cathode(models, config, stored=stored if name != "cathode" else None)
    elif name == "cwola_stored":
        assert stored is not None
        model = methods.cwola_stored(stored, config)
    elif name == "idealised":
        assert stored is not None and true_background is not None
        model = methods.idealised(stored, true_background, config)
    else:
        msg = f"unknown method {name!r}; choose from {methods.METHODS}"
        raise ValueError(msg)
    return lambda f: methods.scores(model, f)


def evaluate(
    name: str,
    score: Any,
    test: Events,
    config: methods.SearchConfig,
    *,
    bump_events: Events | None = None,
) -> MethodResult:
    if test.is_signal is None:
        raise ValueError("test events need truth labels (is_signal)")
    sr = test.select(test.in_window(config.signal_region_gev))
    assert sr.is_signal is not None
    result_roc = roc(score(sr.features), sr.is_signal)
    bumps: tuple[BumpResult, ...] = ()
    if bump_events is not None and len(bump_events):
        bumps = tuple(
            bump_hunt(
                bump_events.mjj,
                score(bump_events.features),
                signal_region_gev=config.signal_region_gev,
                spurious_fraction=SPURIOUS_FRACTIONS.get(name, 0.0),
            )
        )
    return MethodResult(name, result_roc, bumps)


def plot_curves(results: Sequence[MethodResult], path: Path, title: str = "") -> None:
    fig = Figure(figsize=(11, 4.5))
    ax_roc, ax_sic = fig.subplots(1, 2)
    for result in results:
        r = result.roc
        ok = r.fpr > 0
        ax_roc.plot(r.tpr[ok], 1 / r.fpr[ok], label=f"{result.name} (AUC {r.auc:.3f})")
        sic = r.sic()
        enough = r.fpr * r.n_background >= 25
        ax_sic.plot(r.tpr[enough], sic[enough], label=f"{result.name} (max {r.max_sic():.2f})")
    ax_roc.set(xlabel="signal efficiency ε_S", ylabel="background rejection 1/ε_B", yscale="log")
    ax_sic.set(xlabel="signal efficiency ε_S", ylabel="SIC = ε_S/√ε_B")
    ax_sic.axhline(1, color="grey", lw=0.5)
    for ax in (ax_roc, ax_sic):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_bumps(result: MethodResult, path: Path, signal_region_gev: tuple[float, float]) -> None:
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    for bump in result.bumps:
        centres = 0.5 * (bump.edges[1:] + bump.edges[:-1])
        line = ax.step(
            centres,
            bump.counts,
            where="mid",
            label=f"ε={bump.efficiency:g}: Z={bump.significance:.1f}",
        )
        ax.plot(centres, bump.fit, ls="--", color=line[0].get_color())
    ax.axvspan(*signal_region_gev, color="grey", alpha=0.15, label="signal region")
    ax.set(
        xlabel="m_jj [GeV]",
        ylabel="events / bin",
        yscale="log",
        title=f"{result.name}: mjj after cuts, dashed = fit outside SR",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_report(
    results: Sequence[MethodResult],
    out_dir: Path,
    config: methods.SearchConfig,
    extra: Mapping[str, Any],
    title: str = "",
) -> dict[str, Any]:
    """PNG plots and ``summary.json`` in ``out_dir``; returns the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_curves(results, out_dir / "roc_sic.png", title)
    for result in results:
        if result.bumps:
            plot_bumps(result, out_dir / f"bump_{result.name}.png", config.signal_region_gev)
    summary = {
        **extra,
        "signal_region_gev": list(config.signal_region_gev),
        "methods": {r.name: r.summary() for r in results},
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def analyze(
    method: str,
    archive_dir: str | Path,
    test: Events,
    out_dir: str | Path,
    *,
    stored: Events | None = None,
    config: methods.SearchConfig | None = None,
    scan_config: ScanConfig | None = None,
) -> dict[str, Any]:
    """``trigfarm analyze METHOD``: load the archive's latest flows, run on the labelled
    ``test`` events (and the ``stored`` ones, when given), report.

    The significance reported is the scan's (``analysis.scan``): every window of
    ``scan_config``, on the stored events when given (else the test events), with a global
    p-value that states its method; ``summary["scan"]`` holds it and every local test.
    """
    config = config or methods.SearchConfig()
    scan_config = scan_config or ScanConfig()
    archive = Archive(archive_dir)
    snapshots = archive.snapshots(latest_per_node=True)
    models = methods.FlowModels.from_snapshots(snapshots)
    name = "cathode_hybrid" if method == "cathode" and stored is not None else method
    log.info("%s on flows from %s (%d events seen)", name, models.nodes, models.events_seen)
    score = score_method(name, models, config, stored=stored)
    result = evaluate(name, score, test, config)
    data = stored or test
    scorer = window_scorer(name, FlowSets(snapshots), config, data.features, stored=stored)
    scanned = scan(data.mjj, scorer, scan_config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_pvalues(scanned, out / "scan_pvalues.png")
    plot_spectra(scanned, out / "scan_spectra.png")
    extra = {
        "method": name,
        "archive": str(archive_dir),
        "nodes": list(models.nodes),
        "events_seen_by_flows": models.events_seen,
        "storage": archive.storage(),
        "scan": {
            "on": "stored events" if stored is not None else "test events",
            **scanned.summary(),
        },
    }
    return write_report([result], out, config, extra, title=f"{name} from {archive_dir}")
