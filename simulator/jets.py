"""Jet clustering with FastJet and the event content of schema v1.

``fatjet_content`` clusters anti-kT R=1.0 jets and returns the two leading ones (heavier
first), their constituents and the high-level features. ``l1_objects`` builds the
Govorkova et al. L1 layout (MET, 4 e/gamma, 4 muons, 10 anti-kT R=0.4 jets).

N-subjettiness uses beta = 1 with exclusive-kT axes (no axis minimisation), normalised by
sum(pT) x R0 with R0 = 1.0; the ratios tau21 = tau2/tau1 and tau32 = tau3/tau2 do not
depend on R0. A jet with tau1 = 0 (one constituent) gets tau21 = 0, as in the LHCO reader.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Annotated, Literal, get_args

import awkward as ak
import fastjet
import numpy as np
import pydantic
from pydantic import ConfigDict, Field

from simulator.detector import Objects
from simulator.particles import Particles, delta_phi, pseudorapidity, rapidity
from stream.schema import FEATURE_NAMES, N_CONSTITUENTS, N_FATJETS, N_L1_OBJECTS

# FastJet prints a banner on first use; this project prints nothing it did not ask for.
fastjet._swig.ClusterSequence.set_fastjet_banner_stream(None)

_FEATURE_INDEX = {name: i for i, name in enumerate(FEATURE_NAMES)}

#: How tau_N is computed: FastJet contrib's definition, or the LHCO features files' own.
TauConvention = Literal["fastjet", "lhco-features"]
TAU_CONVENTIONS: tuple[str, ...] = get_args(TauConvention)


@pydantic.dataclasses.dataclass(
    frozen=True, slots=True, kw_only=True, config=ConfigDict(extra="forbid")
)
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
        tau_convention: ``"fastjet"`` (FastJet contrib's N-subjettiness, the default) or
            ``"lhco-features"`` (the LHCO features files' own way, see ``nsubjettiness``).
    """

    fatjet_radius: Annotated[float, Field(gt=0)] = 1.0
    fatjet_pt_min_gev: float = 20.0
    max_constituents: Annotated[int, Field(ge=1)] = N_CONSTITUENTS
    jet_radius: Annotated[float, Field(gt=0)] = 0.4
    jet_pt_min_gev: float = 15.0
    jet_eta_max: float = 4.0
    egamma_eta_max: float = 3.0
    muon_eta_max: float = 2.4
    nsubjettiness_r0: float = 1.0
    tau_convention: TauConvention = "fastjet"


@dataclass(frozen=True, slots=True)
class FatJetContent:
    """Per-event fat-jet columns, ready for an ``EventBatch``."""

    fatjets: np.ndarray  # (N, 2, 4) pT, eta, phi, m; heavier first
    constituents: np.ndarray | None  # (N, 2, C, 4) pT, eta, phi, E; None: features only
    n_constituents: np.ndarray  # (N, 2)
    features: np.ndarray  # (N, 8)
    leading_pt: np.ndarray  # (N,) pT of the leading (highest-pT) fat jet

    def columns(self) -> dict[str, np.ndarray]:
        """The ``EventBatch`` columns: fat jets, constituents, their counts and features."""
        columns = {"fatjets": self.fatjets, "features": self.features}
        if self.constituents is not None:
            columns["constituents"] = self.constituents
            columns["n_constituents"] = self.n_constituents
        return columns

    def take_events(self, keep: np.ndarray) -> FatJetContent:
        """The events where ``keep`` (a boolean mask or index array) selects."""
        return FatJetContent(
            self.fatjets[keep],
            None if self.constituents is None else self.constituents[keep],
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


@dataclass(frozen=True, slots=True)
class ClusteredFatJets:
    """The two leading (highest-pT) anti-kT fat jets of each event and their constituents.

    Everything is flat numpy: ``four`` holds the jets' (px, py, pz, E), zero-padded; the
    constituents of jet ``slot`` of event ``i`` are the particles
    ``particles[index[k]]`` for the ``k`` where ``jet_of[k] == 2 * i + slot``, stored jet
    after jet. Features are computed from here (``content``), for all events or only the
    selected ones, so a filter on the leading pT skips N-subjettiness for rejected events.
    """

    particles: Particles
    four: np.ndarray  # (N, 2, 4) by pT
    n_jets: np.ndarray  # (N,)
    index: np.ndarray  # (K,) constituent -> particle
    jet_of: np.ndarray  # (K,) constituent -> 2 * event + slot, non-decreasing

    @property
    def n_events(self) -> int:
        return int(self.n_jets.size)

    @property
    def leading_pt(self) -> np.ndarray:
        """pT of the highest-pT fat jet per event (0 without jets)."""
        return np.hypot(self.four[:, 0, 0], self.four[:, 0, 1])

    def content(
        self,
        config: JetConfig | None = None,
        *,
        events: np.ndarray | None = None,
        with_constituents: bool = True,
    ) -> FatJetContent:
        """The schema's fat-jet columns and features for ``events`` (default: all).

        Arguments:
            events: a boolean mask or sorted index array of events to keep.
            with_constituents: also build the (N, 2, C, 4) constituent table; a
                features-only caller skips it.
        """
        cfg = config or JetConfig()
        chosen = np.arange(self.n_events) if events is None else np.arange(self.n_events)[events]
        n_events = chosen.size
        # Map kept jets to new flat jet numbers; drop the others' constituents.
        new_event = np.full(self.n_events, -1, np.int64)
        new_event[chosen] = np.arange(n_events)
        keep_const = new_event[self.jet_of // 2] >= 0
        index = self.index[keep_const]
        jet_of = 2 * new_event[self.jet_of[keep_const] // 2] + self.jet_of[keep_const] % 2
        p = self.particles
        cpx, cpy, cpz, ce = p.px[index], p.py[index], p.pz[index], p.e[index]
        n_const = np.bincount(jet_of, minlength=2 * n_events).reshape(n_events, N_FATJETS)

        four = self.four[chosen]
        kin = _kinematics(*np.moveaxis(four, -1, 0))  # (N, 2, 4) by pT
        n_jets = self.n_jets[chosen]
        taus = nsubjettiness(
            cpx, cpy, cpz, ce, n_const.ravel(), cfg.nsubjettiness_r0, convention=cfg.tau_convention
        )
        taus = taus.reshape(n_events, N_FATJETS, 3)

        # Order heavier first.
        swap = kin[:, 1, 3] > kin[:, 0, 3]
        perm = np.where(swap[:, None], [1, 0], [0, 1])
        rows = np.arange(n_events)[:, None]
        kin_m = kin[rows, perm]
        taus_m = taus[rows, perm]
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
        constituents = None
        if with_constituents:
            c_kin = _constituent_table(cpx, cpy, cpz, ce, jet_of, n_events, cfg.max_constituents)
            constituents = c_kin[rows, perm].astype("<f4")
        return FatJetContent(
            fatjets=kin_m.astype("<f4"),
            constituents=constituents,
            n_constituents=np.minimum(n_const_m, cfg.max_constituents).astype("<i2"),
            features=features.astype("<f4"),
            leading_pt=kin[:, 0, 0],
        )


def cluster_fatjets(particles: Particles, config: JetConfig | None = None) -> ClusteredFatJets:
    """Anti-kT fat jets (FastJet's C++, all events in one call); keep the two leading."""
    cfg = config or JetConfig()
    n_events = particles.n_events
    definition = fastjet.JetDefinition(fastjet.antikt_algorithm, cfg.fatjet_radius)
    sequence = fastjet.ClusterSequence(_awkward(particles), definition)
    jets = sequence.inclusive_jets(min_pt=cfg.fatjet_pt_min_gev)
    members = sequence.constituent_index(min_pt=cfg.fatjet_pt_min_gev)
    order = ak.argsort(jets.px**2 + jets.py**2, axis=1, ascending=False, stable=True)
    jets = jets[order][:, :N_FATJETS]
    members = members[order][:, :N_FATJETS]
    n_jets = ak.to_numpy(ak.num(jets, axis=1)).astype(np.int64)
    four = np.zeros((n_events, N_FATJETS, 4))
    jet_event = np.repeat(np.arange(n_events), n_jets)
    jet_slot = np.arange(jet_event.size) - np.repeat(np.cumsum(n_jets) - n_jets, n_jets)
    for k, name in enumerate(("px", "py", "pz", "E")):
        four[jet_event, jet_slot, k] = ak.to_numpy(ak.flatten(jets[name]))
    per_jet = ak.to_numpy(ak.flatten(ak.num(members, axis=2))).astype(np.int64)
    jet_key = np.repeat(2 * jet_event + jet_slot, per_jet)
    local = ak.to_numpy(ak.flatten(members, axis=None)).astype(np.int64)
    index = particles.offsets[:-1][jet_key // 2] + local
    return ClusteredFatJets(particles, four, n_jets, index, jet_key)


def fatjet_content(
    particles: Particles, config: JetConfig | None = None, *, with_constituents: bool = True
) -> FatJetContent:
    """Cluster anti-kT fat jets and compute the schema's fat-jet columns and features.

    The two highest-pT jets are kept and stored heavier first; mjj is their invariant
    mass and delta_mj = m(lighter) - m(heavier) <= 0 (the LHCO ordering of
    ``simulator.lhco_features``). Events with fewer than two jets get zeros.
    """
    clustered = cluster_fatjets(particles, config)
    return clustered.content(config, with_constituents=with_constituents)


def single_jet_content(particles: Particles, config: JetConfig | None = None) -> FatJetContent:
    """Fat-jet columns for events that are one jet each (a jet-tagging sample).

    All of an event's particles form the jet in slot 0, without reclustering; slot 1 is
    empty. Of the features only mj1, tau21_j1 and tau32_j1 are set; the two-jet ones
    (mjj, delta_mj, deta_jj) and the second jet's are zero.
    """
    cfg = config or JetConfig()
    n_events = particles.n_events
    ev = particles.event_index
    four = [
        np.bincount(ev, x, minlength=n_events)
        for x in (particles.px, particles.py, particles.pz, particles.e)
    ]
    fatjets = np.zeros((n_events, N_FATJETS, 4))
    fatjets[:, 0] = _kinematics(*four)
    c_kin = _constituent_table(
        particles.px,
        particles.py,
        particles.pz,
        particles.e,
        2 * ev,
        n_events,
        cfg.max_constituents,
    )
    taus = nsubjettiness(
        particles.px,
        particles.py,
        particles.pz,
        particles.e,
        particles.counts,
        cfg.nsubjettiness_r0,
        convention=cfg.tau_convention,
    )
    n_const = np.zeros((n_events, N_FATJETS), np.int64)
    n_const[:, 0] = particles.counts
    features = np.zeros((n_events, len(FEATURE_NAMES)))
    features[:, _FEATURE_INDEX["mj1"]] = fatjets[:, 0, 3]
    features[:, _FEATURE_INDEX["tau21_j1"]] = _ratio(taus[:, 1], taus[:, 0])
    features[:, _FEATURE_INDEX["tau32_j1"]] = _ratio(taus[:, 2], taus[:, 1])
    return FatJetContent(
        fatjets=fatjets.astype("<f4"),
        constituents=c_kin.astype("<f4"),
        n_constituents=np.minimum(n_const, cfg.max_constituents).astype("<i2"),
        features=features.astype("<f4"),
        leading_pt=fatjets[:, 0, 0],
    )


def _constituent_table(
    px: np.ndarray,
    py: np.ndarray,
    pz: np.ndarray,
    e: np.ndarray,
    jet_of: np.ndarray,
    n_events: int,
    max_constituents: int,
) -> np.ndarray:
    """(N, 2, C, 4) constituents as (pT, eta, phi, E), pT-ordered per jet, zero-padded.

    ``jet_of`` numbers each constituent's jet as 2 x event + slot.
    """
    pt = np.hypot(px, py)
    order = np.lexsort((-pt, jet_of))
    key = jet_of[order]
    starts = np.searchsorted(key, np.arange(2 * n_events))
    rank = np.arange(key.size) - starts[key]
    top = rank < max_constituents
    sel = order[top]
    kin = _kinematics(px[sel], py[sel], pz[sel], e[sel])
    kin[:, 3] = e[sel]  # store E, not mass
    out = np.zeros((n_events, N_FATJETS, max_constituents, 4))
    out[key[top] // 2, key[top] % 2, rank[top]] = kin
    return out


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.zeros_like(numerator)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


#: FastJet's largest allowed R; the N-subjettiness KT_Axes cluster with it (no beam jets).
_KT_AXES_R = 1000.0


def nsubjettiness(
    px: np.ndarray,
    py: np.ndarray,
    pz: np.ndarray,
    e: np.ndarray,
    counts: np.ndarray,
    r0: float = 1.0,
    *,
    convention: str = "fastjet",
) -> np.ndarray:
    """tau1, tau2, tau3 per jet, shape (J, 3), for jets given as flat constituents + counts.

    The definition of FastJet contrib's ``Nsubjettiness`` with ``NormalizedMeasure(beta=1,
    R0)`` and ``KT_Axes``: the axes are the exclusive kT jets (E scheme, R = 1000) of each
    jet's constituents, one FastJet clustering per jet for all three N (FastJet's C++,
    every jet in one call), and tau_N = sum_i pT_i min_k dR(i, axis_k) / (R0 sum_i pT_i)
    with dR in rapidity and azimuth, in numpy. A jet with at most N constituents gets
    tau_N = 0; an empty jet gets zeros.

    ``convention="lhco-features"`` reproduces how the LHCO features files
    (``lhco-rnd-100k``) computed their taus instead, for like-for-like comparisons: the
    axes are the exclusive jets of a kT clustering with R = 1, and dR uses
    pseudorapidity and the plain difference of azimuths in (-pi, pi], not wrapped, so a
    jet across phi = +-pi gets too large taus.
    """
    if convention not in TAU_CONVENTIONS:
        msg = f"convention must be one of {TAU_CONVENTIONS}, got {convention!r}"
        raise ValueError(msg)
    lhco = convention == "lhco-features"
    n_jets = counts.size
    out = np.zeros((n_jets, 3))
    filled = counts > 0
    if not filled.any():
        return out
    jet = np.repeat(np.arange(n_jets), counts)
    record = ak.zip({"px": px, "py": py, "pz": pz, "E": e}, with_name="Momentum4D")
    grouped = ak.unflatten(record, counts[filled])
    definition = fastjet.JetDefinition(fastjet.kt_algorithm, 1.0 if lhco else _KT_AXES_R)
    sequence = fastjet.ClusterSequence(grouped, definition)
    pt = np.hypot(px, py)
    y = pseudorapidity(px, py, pz) if lhco else rapidity(e, pz)
    phi = np.arctan2(py, px)
    norm = np.bincount(jet, pt, minlength=n_jets) * r0
    jet_rows = np.flatnonzero(filled)
    for n in (1, 2, 3):
        with warnings.catch_warnings():
            # fastjet's check compares a JetDefinition with algorithm ids and always warns.
            warnings.filterwarnings("ignore", "dcut and exclusive jets", UserWarning)
            axes = sequence.exclusive_jets_up_to(n)
        n_axes = ak.to_numpy(ak.num(axes, axis=1))
        a_px, a_py, a_pz, a_e = (ak.to_numpy(ak.flatten(axes[f])) for f in ("px", "py", "pz", "E"))
        a_y = pseudorapidity(a_px, a_py, a_pz) if lhco else rapidity(a_e, a_pz)
        a_phi = np.arctan2(a_py, a_px)
        slot = np.arange(n_axes.sum()) - np.repeat(np.cumsum(n_axes) - n_axes, n_axes)
        owner = np.repeat(jet_rows, n_axes)
        axis_y = np.full((n_jets, n), np.nan)
        axis_phi = np.full((n_jets, n), np.nan)
        axis_y[owner, slot] = a_y
        axis_phi[owner, slot] = a_phi
        dy = y[:, None] - axis_y[jet]
        dphi = phi[:, None] - axis_phi[jet] if lhco else delta_phi(phi[:, None], axis_phi[jet])
        distance = np.sqrt(dy * dy + dphi * dphi)
        nearest = np.fmin.reduce(distance, axis=1)
        out[:, n - 1] = np.bincount(jet, pt * nearest, minlength=n_jets)
    return _ratio(out, np.repeat(norm[:, None], 3, axis=1))


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
