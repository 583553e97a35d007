"""Jet clustering with FastJet and the event content of schema v1.

``fatjet_content`` clusters anti-kT R=1.0 jets and returns the two leading ones (heavier
first), their constituents and the high-level features. ``l1_objects`` builds the
Govorkova et al. L1 layout (MET, 4 e/gamma, 4 muons, 10 anti-kT R=0.4 jets).

N-subjettiness uses beta = 1 with exclusive-kT axes (no axis minimisation), normalised by
sum(pT) x R0 with R0 = 1.0; the ratios tau21 = tau2/tau1 and tau32 = tau3/tau2 do not
depend on R0. A jet with tau1 = 0 (one constituent) gets tau21 = 0, as in the LHCO reader.
"""

from __future__ import annotations

from dataclasses import dataclass

import awkward as ak
import fastjet
import numpy as np

from simulator.detector import Objects
from simulator.particles import Particles, pseudorapidity
from stream.schema import FEATURE_NAMES, N_CONSTITUENTS, N_FATJETS, N_L1_OBJECTS

# FastJet prints a banner on first use; this project prints nothing it did not ask for.
fastjet._swig.ClusterSequence.set_fastjet_banner_stream(None)

_FEATURE_INDEX = {name: i for i, name in enumerate(FEATURE_NAMES)}


@dataclass(frozen=True, slots=True, kw_only=True)
class JetConfig:
    """Jet definitions and the L1 object selection.

    Attributes:
        fatjet_radius: anti-kT R for the fat jets.
        fatjet_pt_min_gev: fat jets below this are not kept.
        max_constituents: constituents stored per fat jet (pT-ordered, zero-padded).
        jet_radius: anti-kT R for the L1 jets.
        jet_pt_min_gev, jet_eta_max: L1 jet selection (Govorkova et al.: 15 GeV, 4.0).
        egamma_eta_max, muon_eta_max: L1 e/gamma and muon acceptance.
        nsubjettiness_r0: the R0 of the normalisation.
    """

    fatjet_radius: float = 1.0
    fatjet_pt_min_gev: float = 20.0
    max_constituents: int = N_CONSTITUENTS
    jet_radius: float = 0.4
    jet_pt_min_gev: float = 15.0
    jet_eta_max: float = 4.0
    egamma_eta_max: float = 3.0
    muon_eta_max: float = 2.4
    nsubjettiness_r0: float = 1.0

    def __post_init__(self) -> None:
        if self.jet_radius <= 0 or self.fatjet_radius <= 0:
            msg = f"jet radii must be > 0, got {self.jet_radius} and {self.fatjet_radius}"
            raise ValueError(msg)
        if self.max_constituents < 1:
            msg = f"max_constituents must be >= 1, got {self.max_constituents}"
            raise ValueError(msg)


@dataclass(frozen=True, slots=True)
class FatJetContent:
    """Per-event fat-jet columns, ready for an ``EventBatch``."""

    fatjets: np.ndarray  # (N, 2, 4) pT, eta, phi, m; heavier first
    constituents: np.ndarray  # (N, 2, C, 4) pT, eta, phi, E
    n_constituents: np.ndarray  # (N, 2)
    features: np.ndarray  # (N, 8)
    leading_pt: np.ndarray  # (N,) pT of the leading (highest-pT) fat jet

    def columns(self) -> dict[str, np.ndarray]:
        """The ``EventBatch`` columns: fat jets, constituents, their counts and features."""
        return {
            "fatjets": self.fatjets,
            "constituents": self.constituents,
            "n_constituents": self.n_constituents,
            "features": self.features,
        }

    def take_events(self, keep: np.ndarray) -> FatJetContent:
        """The events where ``keep`` (a boolean mask or index array) selects."""
        return FatJetContent(
            self.fatjets[keep],
            self.constituents[keep],
            self.n_constituents[keep],
            self.features[keep],
            self.leading_pt[keep],
        )


def _awkward(particles: Particles) -> ak.Array:
    record = ak.zip(
        {"px": particles.px, "py": particles.py, "pz": particles.pz, "E": particles.e},
        with_name="Momentum4D",
    )
    return ak.unflatten(record, particles.counts)


def _kinematics(px: np.ndarray, py: np.ndarray, pz: np.ndarray, e: np.ndarray) -> np.ndarray:
    """(pT, eta, phi, m) stacked on the last axis."""
    pt = np.hypot(px, py)
    eta = np.where(pt > 0, pseudorapidity(px, py, pz), 0.0)
    phi = np.where(pt > 0, np.arctan2(py, px), 0.0)
    mass = np.sqrt(np.maximum(e * e - px * px - py * py - pz * pz, 0.0))
    return np.stack([pt, eta, phi, mass], axis=-1)


def _padded(array: ak.Array, length: int, axis: int) -> np.ndarray:
    return ak.to_numpy(ak.fill_none(ak.pad_none(array, length, axis=axis, clip=True), 0.0))


def fatjet_content(particles: Particles, config: JetConfig | None = None) -> FatJetContent:
    """Cluster anti-kT fat jets and compute the schema's fat-jet columns and features.

    The two highest-pT jets are kept and stored heavier first; mjj is their invariant
    mass and delta_mj = m(lighter) - m(heavier) <= 0 (the LHCO ordering of
    ``simulator.lhco_features``). Events with fewer than two jets get zeros.
    """
    cfg = config or JetConfig()
    n_events = particles.n_events
    events = _awkward(particles)
    definition = fastjet.JetDefinition(fastjet.antikt_algorithm, cfg.fatjet_radius)
    sequence = fastjet.ClusterSequence(events, definition)
    jets = sequence.inclusive_jets(min_pt=cfg.fatjet_pt_min_gev)
    constituents = sequence.constituents(min_pt=cfg.fatjet_pt_min_gev)
    order = ak.argsort(np.hypot(jets.px, jets.py), axis=1, ascending=False)
    jets = jets[order][:, :N_FATJETS]
    constituents = constituents[order][:, :N_FATJETS]

    four = np.stack([_padded(jets[f], N_FATJETS, 1) for f in ("px", "py", "pz", "E")], -1)
    kin = _kinematics(*np.moveaxis(four, -1, 0))  # (N, 2, 4) by pT
    n_jets = ak.to_numpy(ak.num(jets, axis=1))

    c_kin, n_const = _constituent_columns(constituents, cfg.max_constituents)
    taus = _nsubjettiness(constituents, cfg.nsubjettiness_r0)  # (N, 2, 3) by pT

    # Order heavier first.
    swap = kin[:, 1, 3] > kin[:, 0, 3]
    perm = np.where(swap[:, None], [1, 0], [0, 1])
    rows = np.arange(n_events)[:, None]
    kin_m = kin[rows, perm]
    taus_m = taus[rows, perm]
    c_kin_m = c_kin[rows, perm]
    n_const_m = n_const[rows, perm]

    features = np.zeros((n_events, len(FEATURE_NAMES)), np.float64)
    two = n_jets >= 2
    total = four[:, 0] + four[:, 1]
    mjj = np.sqrt(np.maximum(total[:, 3] ** 2 - (total[:, :3] ** 2).sum(axis=1), 0.0))
    values = {
        "mjj": np.where(two, mjj, 0.0),
        "mj1": kin_m[:, 0, 3],
        "delta_mj": np.where(two, kin_m[:, 1, 3] - kin_m[:, 0, 3], 0.0),
        "tau21_j1": _ratio(taus_m[:, 0, 1], taus_m[:, 0, 0]),
        "tau21_j2": _ratio(taus_m[:, 1, 1], taus_m[:, 1, 0]),
        "tau32_j1": _ratio(taus_m[:, 0, 2], taus_m[:, 0, 1]),
        "tau32_j2": _ratio(taus_m[:, 1, 2], taus_m[:, 1, 1]),
        "deta_jj": np.where(two, np.abs(kin_m[:, 0, 1] - kin_m[:, 1, 1]), 0.0),
    }
    for name, column in values.items():
        features[:, _FEATURE_INDEX[name]] = column
    return FatJetContent(
        fatjets=kin_m.astype("<f4"),
        constituents=c_kin_m.astype("<f4"),
        n_constituents=np.minimum(n_const_m, cfg.max_constituents).astype("<i2"),
        features=features.astype("<f4"),
        leading_pt=kin[:, 0, 0],
    )


def single_jet_content(particles: Particles, config: JetConfig | None = None) -> FatJetContent:
    """Fat-jet columns for events that are one jet each (a jet-tagging sample).

    All of an event's particles form the jet in slot 0, without reclustering; slot 1 is
    empty. Of the features only mj1, tau21_j1 and tau32_j1 are set; the two-jet ones
    (mjj, delta_mj, deta_jj) and the second jet's are zero.
    """
    cfg = config or JetConfig()
    n_events = particles.n_events
    constituents = ak.unflatten(_awkward(particles), 1, axis=0)  # (N, 1, n)
    ev = particles.event_index
    four = [
        np.bincount(ev, x, minlength=n_events)
        for x in (particles.px, particles.py, particles.pz, particles.e)
    ]
    fatjets = np.zeros((n_events, N_FATJETS, 4))
    fatjets[:, 0] = _kinematics(*four)
    c_kin, n_const = _constituent_columns(constituents, cfg.max_constituents)
    taus = _nsubjettiness(constituents, cfg.nsubjettiness_r0)
    features = np.zeros((n_events, len(FEATURE_NAMES)))
    features[:, _FEATURE_INDEX["mj1"]] = fatjets[:, 0, 3]
    features[:, _FEATURE_INDEX["tau21_j1"]] = _ratio(taus[:, 0, 1], taus[:, 0, 0])
    features[:, _FEATURE_INDEX["tau32_j1"]] = _ratio(taus[:, 0, 2], taus[:, 0, 1])
    return FatJetContent(
        fatjets=fatjets.astype("<f4"),
        constituents=c_kin.astype("<f4"),
        n_constituents=np.minimum(n_const, cfg.max_constituents).astype("<i2"),
        features=features.astype("<f4"),
        leading_pt=fatjets[:, 0, 0],
    )


def _constituent_columns(
    constituents: ak.Array, max_constituents: int
) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2, C, 4) constituents as (pT, eta, phi, E), pT-ordered and zero-padded, and the
    (N, 2) number of constituents of each jet (before truncation to C)."""
    c_pt = np.hypot(constituents.px, constituents.py)
    constituents = constituents[ak.argsort(c_pt, axis=2, ascending=False)]
    n_const = _padded(ak.num(constituents, axis=2), N_FATJETS, 1).astype(np.int64)
    c_four = np.stack(
        [
            _padded(_padded_jets(constituents[f], N_FATJETS), max_constituents, 2)
            for f in ("px", "py", "pz", "E")
        ],
        -1,
    )
    c_kin = _kinematics(*np.moveaxis(c_four, -1, 0))
    c_kin[..., 3] = c_four[..., 3]  # store E, not mass
    c_kin[c_four[..., 3] == 0] = 0.0
    return c_kin, n_const


def _padded_jets(array: ak.Array, n_jets: int) -> ak.Array:
    """Pad the jet axis (axis 1) with empty constituent lists."""
    return ak.fill_none(ak.pad_none(array, n_jets, axis=1, clip=True), [], axis=1)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.zeros_like(numerator)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _nsubjettiness(constituents: ak.Array, r0: float) -> np.ndarray:
    """tau1, tau2, tau3 (beta = 1, exclusive-kT axes) per jet, shape (N, 2, 3)."""
    n_events = len(constituents)
    n_per_event = ak.to_numpy(ak.num(constituents, axis=1))
    flat = ak.flatten(constituents, axis=1)
    out = np.zeros((n_events, N_FATJETS, 3))
    if len(flat) == 0:
        return out
    definition = fastjet.JetDefinition(fastjet.kt_algorithm, r0)
    sequence = fastjet.ClusterSequence(flat, definition)
    taus = ak.to_numpy(
        sequence.njettiness(
            measure_definition="NormalizedMeasure",
            axes_definition="KT_Axes",
            njets=[1, 2, 3],
            beta=1.0,
            R0=r0,
        )
    ).reshape(-1, 3)
    event = np.repeat(np.arange(n_events), n_per_event)
    slot = np.concatenate([np.arange(k) for k in n_per_event]) if len(event) else event
    out[event, slot] = taus
    return out


def l1_objects(
    candidates: Particles,
    egamma: Objects,
    muons: Objects,
    met_x: np.ndarray,
    met_y: np.ndarray,
    config: JetConfig | None = None,
) -> np.ndarray:
    """The (N, 19, 3) L1 layout: MET, 4 e/gamma, 4 muons, 10 R=0.4 jets as (pT, eta, phi).

    Each group is pT-ordered and zero-padded; the MET row is (MET, 0, phi).
    """
    cfg = config or JetConfig()
    definition = fastjet.JetDefinition(fastjet.antikt_algorithm, cfg.jet_radius)
    sequence = fastjet.ClusterSequence(_awkward(candidates), definition)
    jets = sequence.inclusive_jets(min_pt=cfg.jet_pt_min_gev)
    counts = ak.to_numpy(ak.num(jets, axis=1))
    flat = {f: ak.to_numpy(ak.flatten(jets[f])) for f in ("px", "py", "pz", "E")}
    kin = _kinematics(flat["px"], flat["py"], flat["pz"], flat["E"])
    jet_objects = Objects(counts, kin[:, 0], kin[:, 1], kin[:, 2])
    return l1_layout(met_x, met_y, egamma, muons, jet_objects, cfg)


def l1_layout(
    met_x: np.ndarray,
    met_y: np.ndarray,
    egamma: Objects,
    muons: Objects,
    jets: Objects,
    config: JetConfig | None = None,
) -> np.ndarray:
    """The (N, 19, 3) L1 layout from reconstructed objects, with the L1 acceptance cuts.

    Keeps the 4 leading e/gamma, 4 muons and 10 jets inside their |eta| acceptance (jets
    also above ``jet_pt_min_gev``), pT-ordered and zero-padded; the MET row is (MET, 0, phi).
    """
    cfg = config or JetConfig()
    out = np.zeros((met_x.size, N_L1_OBJECTS, 3), np.float64)
    met = np.hypot(met_x, met_y)
    out[:, 0, 0] = met
    out[:, 0, 2] = np.where(met > 0, np.arctan2(met_y, met_x), 0.0)
    out[:, 1:5] = _top_objects(egamma, 4, cfg.egamma_eta_max)
    out[:, 5:9] = _top_objects(muons, 4, cfg.muon_eta_max)
    hard = jets.pt >= cfg.jet_pt_min_gev
    jets = Objects(
        np.bincount(
            np.repeat(np.arange(jets.counts.size), jets.counts)[hard], minlength=jets.counts.size
        ),
        jets.pt[hard],
        jets.eta[hard],
        jets.phi[hard],
    )
    out[:, 9:19] = _top_objects(jets, 10, cfg.jet_eta_max)
    return out.astype("<f4")


def _top_objects(objects: Objects, n: int, eta_max: float) -> np.ndarray:
    """The ``n`` highest-pT objects with |eta| < eta_max per event, (N, n, 3), zero-padded."""
    n_events = objects.counts.size
    ev = np.repeat(np.arange(n_events), objects.counts)
    keep = np.abs(objects.eta) < eta_max
    ev, pt, eta, phi = ev[keep], objects.pt[keep], objects.eta[keep], objects.phi[keep]
    order = np.lexsort((-pt, ev))
    ev, pt, eta, phi = ev[order], pt[order], eta[order], phi[order]
    starts = np.searchsorted(ev, np.arange(n_events))
    rank = np.arange(ev.size) - starts[ev]
    top = rank < n
    out = np.zeros((n_events, n, 3))
    out[ev[top], rank[top]] = np.stack([pt[top], eta[top], phi[top]], axis=1)
    return out
