"""ROC and significance improvement: SIC = TPR / √FPR, on labelled test events.

``max_sic`` ignores working points that keep fewer than ``min_background`` background
events, where √FPR is set by a handful of events and the SIC is noise (the published
LHCO studies cut at a relative background-efficiency error of 20%, i.e. 25 events).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import auc, roc_curve


@dataclass(frozen=True, slots=True)
class Roc:
    """True- and false-positive rates at every threshold, strictest first."""

    tpr: np.ndarray
    fpr: np.ndarray
    n_signal: int
    n_background: int

    @property
    def auc(self) -> float:
        """The area under the ROC (trapezoids between its points)."""
        return float(auc(self.fpr, self.tpr))

    def sic(self) -> np.ndarray:
        """TPR/√FPR at each threshold (NaN where FPR = 0)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.fpr > 0, self.tpr / np.sqrt(self.fpr), np.nan)

    def max_sic(self, *, min_background: int = 25) -> float:
        """The largest SIC over thresholds keeping at least ``min_background`` events."""
        ok = self.fpr * self.n_background >= min_background
        return float(np.nanmax(self.sic()[ok])) if ok.any() else float("nan")

    def sic_at(self, signal_efficiency: float) -> float:
        """SIC at the first threshold whose TPR reaches ``signal_efficiency`` (check
        ``background_at`` for how many events it rests on)."""
        i = int(np.searchsorted(self.tpr, signal_efficiency))
        if i >= self.tpr.size or self.fpr[i] <= 0:
            return float("nan")
        return float(self.tpr[i] / np.sqrt(self.fpr[i]))

    def background_at(self, signal_efficiency: float) -> int:
        """Background test events passing the threshold of ``sic_at``."""
        i = min(int(np.searchsorted(self.tpr, signal_efficiency)), self.tpr.size - 1)
        return round(float(self.fpr[i]) * self.n_background)


def roc(scores: np.ndarray, is_signal: np.ndarray) -> Roc:
    """The ROC of ``scores`` (higher = more signal-like) against boolean labels: one point
    per distinct score (ties are passed or cut together), from (0, 0). A score of ±inf
    ranks first or last, NaN last.

    Example:
        >>> r = roc(np.array([0.9, 0.8, 0.3, 0.1]), np.array([True, False, True, False]))
        >>> r.tpr.tolist(), r.fpr.tolist(), r.auc
        ([0.0, 0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5, 1.0], 0.75)
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(is_signal, dtype=bool)
    if scores.shape != labels.shape or labels.all() or not labels.any():
        msg = "roc needs one score per label and both classes present"
        raise ValueError(msg)
    # sklearn refuses non-finite scores; only their order matters here.
    scores = np.where(np.isfinite(scores), scores, np.where(scores > 0, 1e300, -1e300))
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return Roc(tpr, fpr, int(labels.sum()), int((~labels).sum()))
