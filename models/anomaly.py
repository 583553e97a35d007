"""Anomaly scores from a trained classifier, and mass decorrelation by resampling.

A jet that fits none of the known classes well is anomalous. Four scores, larger is
more anomalous:

- ``max_softmax``: −max_c p(c | x), the baseline of Hendrycks & Gimpel;
- ``entropy``: the softmax entropy −Σ p log p;
- ``mahalanobis``: min over classes of the Mahalanobis distance² of the penultimate
  features to the class mean, with one covariance shared by all classes and estimated
  on training data (Lee et al.; used for jets by Cheng & Courville);
- ``anti_qcd``: the log-odds that a jet is not of the first class (QCD in the shipped
  taggers), ln Σ_{c≠0} p_c / p_0: "unlike QCD" rather than "unlike every known class".
  Any jet with substructure scores high, whether it is like a W, a top or neither; at the
  LHCO-like kinematics it separates three-prong W'→XY jets from QCD where the others
  do not (benchmarks/RESULTS.md).

Mass decorrelation: a tagger that learns jet mass makes a score that sculpts the mass
spectrum. ``mass_decorrelated_indices`` resamples every class to one common jet-mass
histogram (by default the pooled one) before training, so mass alone no longer tells the
classes apart. ``benchmarks/hlt_particlenet.py`` measures the effect on the correlation
between the score and the mass of background jets: on simulator qcd/w/top jets it removed
mass as a discriminant but did not reduce the score-mass correlation of QCD jets (it
decorrelates the labels from mass, not the features; see benchmarks/RESULTS.md).
``distance_correlation`` acts on the score itself: added to the training loss on
background jets (DisCo, Kasieczka & Shih), it penalises any dependence, linear or not,
of the score on the mass.

References:
    T. Cheng and A. Courville, "Invariant representation driven neural classifier for
    anti-QCD jet tagging", arXiv:2201.07199.
    K. Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples
    and Adversarial Attacks", arXiv:1807.03888.
    G. Kasieczka and D. Shih, "Robust Jet Classifiers through Distance Correlation",
    arXiv:2001.05310.
    G. Székely, M. Rizzo and N. Bakirov, "Measuring and testing dependence by correlation
    of distances", Ann. Statist. 35 (2007) 2769.

Example:
    >>> import torch
    >>> logits = torch.tensor([[4.0, 0.0], [0.0, 0.0]])
    >>> [round(v, 3) for v in max_softmax_score(logits).tolist()]
    [-0.982, -0.5]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor, nn

#: The scores of the logits alone (differentiable, so DisCo can act on them).
LogitScore = Literal["max_softmax", "entropy", "anti_qcd"]
AnomalyScore = Literal["max_softmax", "entropy", "mahalanobis", "anti_qcd"]
ANOMALY_SCORES: tuple[str, ...] = get_args(AnomalyScore)


def max_softmax_score(logits: Tensor) -> Tensor:
    """−max softmax probability per jet."""
    return -torch.softmax(logits, dim=-1).max(dim=-1).values


def entropy_score(logits: Tensor) -> Tensor:
    """Softmax entropy per jet (nats)."""
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


class Mahalanobis(nn.Module):
    """Per-class means and a shared precision of penultimate features (state-dict buffers).

    Unfitted until ``fit``; ``fitted`` says which. ``score`` is the squared distance to the
    nearest class mean.
    """

    means: Tensor
    precision: Tensor
    n_fitted: Tensor

    def __init__(self, n_classes: int, n_features: int) -> None:
        super().__init__()
        self.register_buffer("means", torch.zeros(n_classes, n_features))
        self.register_buffer("precision", torch.eye(n_features))
        self.register_buffer("n_fitted", torch.zeros((), dtype=torch.long))

    @property
    def fitted(self) -> bool:
        return bool(self.n_fitted > 0)

    @torch.no_grad()
    def fit(self, embedding: Tensor, labels: Tensor, *, shrinkage: float = 1e-3) -> None:
        """Class means and the shared covariance (with a small ridge) from training jets.

        Raises:
            ValueError: a class without jets, or shapes that do not fit.
        """
        n_classes, n_features = self.means.shape
        if embedding.ndim != 2 or embedding.shape[1] != n_features:
            msg = f"embedding must be (N, {n_features}), got {tuple(embedding.shape)}"
            raise ValueError(msg)
        x = embedding.double()
        means = torch.zeros(n_classes, n_features, dtype=torch.float64)
        for c in range(n_classes):
            rows = x[labels == c]
            if rows.shape[0] == 0:
                msg = f"class {c} has no jets to fit the Mahalanobis means"
                raise ValueError(msg)
            means[c] = rows.mean(0)
        centred = x - means[labels]
        cov = centred.T @ centred / max(x.shape[0] - n_classes, 1)
        ridge = shrinkage * torch.diagonal(cov).mean().clamp(min=1e-12)
        cov += ridge * torch.eye(n_features, dtype=torch.float64)
        self.means.copy_(means.float())
        self.precision.copy_(torch.linalg.inv(cov).float())
        self.n_fitted.fill_(x.shape[0])

    def score(self, embedding: Tensor) -> Tensor:
        """Squared Mahalanobis distance to the nearest class mean, per jet."""
        if not self.fitted:
            raise RuntimeError("the Mahalanobis scorer has not been fitted")
        diff = embedding.unsqueeze(1) - self.means.unsqueeze(0)  # (N, C, D)
        distance = torch.einsum("ncd,de,nce->nc", diff, self.precision, diff)
        return distance.min(dim=1).values


def anti_qcd_score(logits: Tensor) -> Tensor:
    """ln Σ_{c≠0} p_c / p_0 per jet: the log-odds against the first (QCD) class.

    Example:
        >>> round(anti_qcd_score(torch.tensor([[0.0, 0.0, 0.0]])).item(), 3)  # ln 2
        0.693
    """
    return torch.logsumexp(logits[..., 1:], dim=-1) - logits[..., 0]


#: The functions of the ``LogitScore`` names.
LOGIT_SCORES: dict[str, Callable[[Tensor], Tensor]] = {
    "max_softmax": max_softmax_score,
    "entropy": entropy_score,
    "anti_qcd": anti_qcd_score,
}


def anomaly_score(
    name: str, logits: Tensor, embedding: Tensor, mahalanobis: Mahalanobis | None = None
) -> Tensor:
    """The named score (``ANOMALY_SCORES``) per jet.

    Raises:
        ValueError: an unknown name, or ``mahalanobis`` without a fitted scorer.
    """
    if name in LOGIT_SCORES:
        return LOGIT_SCORES[name](logits)
    if name == "mahalanobis":
        if mahalanobis is None or not mahalanobis.fitted:
            raise ValueError("the mahalanobis score needs a fitted Mahalanobis scorer")
        return mahalanobis.score(embedding)
    msg = f"unknown anomaly score {name!r}; known: {', '.join(ANOMALY_SCORES)}"
    raise ValueError(msg)


def distance_correlation(x: Tensor, y: Tensor) -> Tensor:
    """Squared distance correlation dCor²(x, y) of two samples of scalars, in [0, 1].

    Zero in the large-sample limit if and only if x and y are independent, one for an exact
    linear relation; differentiable in both, so it can be a loss term (DisCo). Uses the
    biased (V-statistic) estimator on the n × n pairwise distances; a constant sample has
    no spread and gives 0.

    Raises:
        ValueError: inputs that are not two 1-D samples of one length >= 2.
    """
    if x.ndim != 1 or x.shape != y.shape or x.shape[0] < 2:
        msg = f"need two 1-D samples of one length >= 2, got {tuple(x.shape)}, {tuple(y.shape)}"
        raise ValueError(msg)

    def centred(v: Tensor) -> Tensor:
        d = (v.unsqueeze(0) - v.unsqueeze(1)).abs()
        return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()

    a, b = centred(x), centred(y.to(x.dtype))
    dcov_xy, dcov_xx, dcov_yy = (a * b).mean(), (a * a).mean(), (b * b).mean()
    return dcov_xy / torch.sqrt(dcov_xx * dcov_yy).clamp(min=1e-12)


def mass_decorrelated_indices(
    mass: np.ndarray,
    labels: np.ndarray,
    *,
    bins: np.ndarray | int = 20,
    target: np.ndarray | None = None,
    min_count: int = 5,
    seed: int = 0,
) -> np.ndarray:
    """Indices that resample every class to a common jet-mass histogram.

    Each class keeps as many jets as it has (drawn with replacement, weight target/own
    density per mass bin), so class balance is unchanged while the mass distribution of
    every class becomes ``target`` (default: the pooled histogram of all classes). Only
    bins where every class has at least ``min_count`` jets can be matched: the target is
    zero elsewhere, so jets outside the common mass range are not drawn.

    Arguments:
        mass: (N,) jet masses.
        labels: (N,) integer classes.
        bins: bin edges, or a count of quantile bins over the pooled masses.
        target: (n_bins,) target densities (any scale).
        min_count: jets a class needs in a bin for that bin to be used.
        seed: resampling seed.

    Raises:
        ValueError: no bin is populated by every class.
    """
    rng = np.random.default_rng(seed)
    if isinstance(bins, int):
        edges = np.unique(np.quantile(mass, np.linspace(0, 1, bins + 1)))
    else:
        edges = np.asarray(bins)
    which = np.clip(np.searchsorted(edges, mass, side="right") - 1, 0, len(edges) - 2)
    n_bins = len(edges) - 1
    want = np.bincount(which, minlength=n_bins).astype(float) if target is None else target
    classes = np.unique(labels)
    own_counts = np.stack([np.bincount(which[labels == c], minlength=n_bins) for c in classes])
    want = np.where((own_counts >= min_count).all(0), np.asarray(want, dtype=float), 0.0)
    if want.sum() <= 0:
        raise ValueError("no mass bin holds enough jets of every class to resample to")
    want /= want.sum()
    out = []
    for c, own in zip(classes, own_counts.astype(float), strict=True):
        rows = np.flatnonzero(labels == c)
        weight = np.divide(want, own, out=np.zeros(n_bins), where=own > 0)[which[rows]]
        out.append(rng.choice(rows, size=rows.size, replace=True, p=weight / weight.sum()))
    return np.concatenate(out)
