"""Named, configurable Pythia 8 process recipes at sqrt(s) = 13 TeV.

A recipe is a frozen dataclass: the physics knobs (masses, pT-hat cuts, decay modes) are
fields, and ``pythia_settings()`` turns them into Pythia 8 ``readString`` lines. Recipes
are inert; ``simulator.generate`` builds the generator from one. Change a knob with
``dataclasses.replace`` or ``make_recipe("wprime", m_x_gev=300)``.

Speed choices, shared by every recipe and documented per field: multiparton interactions
(MPI) are off for the hard-jet processes, as in the LHCO R&D sample (made without MPI or
pileup); they are on for the L1-level processes, whose soft activity matters for the L1
objects. Hadron decays stay on by default (taus and b hadrons must decay); switching them
off saves roughly a quarter of the generation time for jet-only studies.

Process ids: 0 and 1 match the LHCO replays (background, W'->XY signal); the L1-level
processes use 10+.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import field
from typing import Annotated, Any, ClassVar, Literal

import pydantic
from pydantic import ConfigDict, Field, model_validator

#: Pythia lines that silence the banner, the init listing and the event listings.
QUIET_SETTINGS = (
    "Print:quiet = on",
    "Init:showProcesses = off",
    "Init:showChangedSettings = off",
    "Init:showChangedParticleData = off",
    "Next:numberCount = 0",
    "Next:numberShowInfo = 0",
    "Next:numberShowProcess = 0",
    "Next:numberShowEvent = 0",
)

_QUARKS = "1 2 3 4 5"

#: A recipe's name and pT-hat cut; a subclass that changes their defaults keeps the
#: constraints only by annotating its fields with these again.
Name = Annotated[str, Field(min_length=1)]
PtHat = Annotated[float, Field(ge=0)]
_Cut = Annotated[float, Field(ge=0)] | None
_Mass = Annotated[float, Field(gt=0)]
_CONFIG = ConfigDict(extra="forbid")


@pydantic.dataclasses.dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class EventFilter:
    """Keep an event if ANY configured condition holds (``None`` switches a condition off).

    Thresholds apply to reconstructed objects after the detector model: an identified,
    isolated electron or muon, an R=0.4 L1 jet, or the leading R=1.0 fat jet. With every
    condition ``None`` every event is kept.
    """

    lepton_pt_gev: _Cut = None
    jet_pt_gev: _Cut = None
    fatjet_pt_gev: _Cut = None

    @property
    def active(self) -> bool:
        """Whether any condition is set."""
        return any(v is not None for v in (self.lepton_pt_gev, self.jet_pt_gev, self.fatjet_pt_gev))


@pydantic.dataclasses.dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class Recipe:
    """Settings shared by every process; subclasses add their physics knobs.

    Attributes:
        name: registry name, e.g. ``"qcd"``.
        process_id: written to ``truth.process_id``.
        is_signal: written to ``truth.is_signal``.
        seed: default random seed (``generate(seed=...)`` overrides it).
        ecm_gev: centre-of-mass energy.
        pthat_min_gev, pthat_max_gev: Pythia's ``PhaseSpace:pTHatMin/Max`` (max < 0: none).
        mpi: multiparton interactions (underlying event). Off saves about 40% of the time.
        isr, fsr: initial- and final-state showers.
        hadron_decays: decay unstable hadrons and taus (``HadronLevel:Decay``).
        pileup_mean: mean number of minimum-bias events overlaid (Poisson); 0 for none.
        event_filter: a reconstructed-level filter, see ``EventFilter``.
        extra_settings: further Pythia lines, applied last.
    """

    kind: ClassVar[str] = "recipe"

    name: Name
    process_id: int
    is_signal: bool = False
    seed: Annotated[int, Field(ge=0, le=900_000_000)] = 1  # Pythia's range
    ecm_gev: Annotated[float, Field(gt=0)] = 13000.0
    pthat_min_gev: PtHat = 0.0
    pthat_max_gev: float = -1.0
    mpi: bool = False
    isr: bool = True
    fsr: bool = True
    hadron_decays: bool = True
    pileup_mean: Annotated[float, Field(ge=0)] = 0.0
    event_filter: EventFilter = field(default_factory=EventFilter)
    extra_settings: tuple[str, ...] = ()
    description: str = ""

    @model_validator(mode="after")
    def _pthat_range(self) -> Recipe:
        if 0 <= self.pthat_max_gev <= self.pthat_min_gev:
            msg = f"pthat_max_gev ({self.pthat_max_gev}) must exceed pthat_min_gev or be < 0"
            raise ValueError(msg)
        return self

    def process_settings(self) -> tuple[str, ...]:
        """The Pythia lines that define the hard process and its decays."""
        raise NotImplementedError

    def pythia_settings(self) -> tuple[str, ...]:
        """Every Pythia line for this recipe, quiet settings included (seed excluded)."""
        common = [
            f"Beams:eCM = {self.ecm_gev:g}",
            f"PartonLevel:MPI = {_onoff(self.mpi)}",
            f"PartonLevel:ISR = {_onoff(self.isr)}",
            f"PartonLevel:FSR = {_onoff(self.fsr)}",
            f"HadronLevel:Decay = {_onoff(self.hadron_decays)}",
        ]
        if self.pthat_min_gev > 0:
            common.append(f"PhaseSpace:pTHatMin = {self.pthat_min_gev:g}")
        if self.pthat_max_gev >= 0:
            common.append(f"PhaseSpace:pTHatMax = {self.pthat_max_gev:g}")
        return (*QUIET_SETTINGS, *common, *self.process_settings(), *self.extra_settings)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for file attributes and logs (``kind`` names the recipe class)."""
        body = dataclasses.asdict(self)
        return {"kind": self.kind, **body}


def _onoff(flag: bool) -> str:
    return "on" if flag else "off"


@pydantic.dataclasses.dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class QCDDijet(Recipe):
    """QCD 2->2 (``HardQCD:all``), pT-hat > 1 TeV by default, for the LHCO selection (a
    fat jet above 1.2 TeV), which keeps about 40% of these events.

    The cut does not cover the selection's turn-on in full: ISR recoil and resolution
    lift some events with pT-hat below 1 TeV over 1.2 TeV; weighted by cross section,
    about 15% of the events selected from pT-hat > 700 GeV come from below 1 TeV, 9% from
    below 900 GeV (``benchmarks/simulator.py``). The LHCO R&D background lacks them
    too: adding pT-hat 0.9-1 TeV moves our mjj and mJ1 away from LHCO's (KS 0.06 against
    0.03 at equal size), so 1 TeV is what an LHCO-like sample needs, and it wastes least
    (2.5 Pythia events per selected event; 800 GeV needs 8.7). For a sample closer to
    complete, set ``pthat_min_gev=800`` (about 3% lost)."""

    kind: ClassVar[str] = "qcd_dijet"

    name: Name = "qcd"
    process_id: int = 0
    pthat_min_gev: PtHat = 1000.0

    def process_settings(self) -> tuple[str, ...]:
        return ("HardQCD:all = on",)


@pydantic.dataclasses.dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class WprimeXY(Recipe):
    """W' -> X Y with X -> qq and Y -> qq, the LHC Olympics 2020 R&D signal.

    Charge: a W'+ cannot decay to two neutral bosons, so X is the neutral H0 (PDG 35) and
    Y the charged H+ (PDG 37). Pythia decays a W'- through the charge-conjugate channel
    (H0 H-), and H- through the conjugate quark pair, so both charges generate. Every
    channel uses ``meMode = 100`` (fixed branching ratios, no width recalculation), the
    bosons get narrow forced widths, and the W' line shape is cut to
    [``mass_window``] x m(W') so that off-shell W' masses below m(X) + m(Y) (which the
    parton luminosity favours) never reach the decay.

    ``x_prongs``/``y_prongs`` = 3 replace the quark pair with q qbar' g in three-body phase
    space: a three-prong jet (the unseen-signal test).
    """

    kind: ClassVar[str] = "wprime_xy"

    name: Name = "wprime"
    process_id: int = 1
    is_signal: bool = True
    m_wprime_gev: float = 3500.0
    m_x_gev: _Mass = 500.0
    m_y_gev: _Mass = 100.0
    width_fraction: Annotated[float, Field(gt=0, lt=0.5)] = 0.01
    mass_window: tuple[float, float] = (0.5, 1.5)
    x_prongs: Literal[2, 3] = 2
    y_prongs: Literal[2, 3] = 2

    @model_validator(mode="after")
    def _decay_fits(self) -> WprimeXY:
        low = self.mass_window[0] * self.m_wprime_gev
        if low <= self.m_x_gev + self.m_y_gev:
            msg = (
                f"m_wprime_gev * mass_window[0] = {low:g} must exceed m_x_gev + m_y_gev "
                f"= {self.m_x_gev + self.m_y_gev:g}"
            )
            raise ValueError(msg)
        return self

    def process_settings(self) -> tuple[str, ...]:
        m, lo, hi = self.m_wprime_gev, *self.mass_window
        lines = [
            "NewGaugeBoson:ffbar2Wprime = on",
            f"34:m0 = {m:g}",
            f"34:mWidth = {self.width_fraction * m:g}",
            "34:doForceWidth = on",
            f"34:mMin = {lo * m:g}",
            f"34:mMax = {hi * m:g}",
            "34:oneChannel = 1 1.0 100 35 37",
        ]
        for pdg, mass in ((35, self.m_x_gev), (37, self.m_y_gev)):
            lines += [
                f"{pdg}:m0 = {mass:g}",
                f"{pdg}:mWidth = {1e-3 * mass:g}",
                f"{pdg}:doForceWidth = on",
                f"{pdg}:mMin = {0.95 * mass:g}",
                f"{pdg}:mMax = {1.05 * mass:g}",
            ]
        # X (neutral): d dbar, u ubar, s sbar, c cbar, b bbar; Y (charged): u dbar, c sbar.
        neutral = [(q, -q) for q in (1, 2, 3, 4, 5)]
        charged = [(2, -1), (4, -3)]
        for pdg, pairs, prongs in (
            (35, neutral, self.x_prongs),
            (37, charged, self.y_prongs),
        ):
            share = 1.0 / len(pairs)
            for i, (a, b) in enumerate(pairs):
                products = f"{a} {b}" if prongs == 2 else f"{a} {b} 21"
                verb = "oneChannel" if i == 0 else "addChannel"
                lines.append(f"{pdg}:{verb} = 1 {share:.6f} 100 {products}")
        return tuple(lines)


@pydantic.dataclasses.dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class TopPair(Recipe):
    """ttbar (gg and qqbar); with ``hadronic`` both W decay to quarks: boosted top jets."""

    kind: ClassVar[str] = "ttbar"

    name: Name = "ttbar"
    process_id: int = 3
    pthat_min_gev: PtHat = 400.0
    hadronic: bool = True

    def process_settings(self) -> tuple[str, ...]:
        lines = ["Top:gg2ttbar = on", "Top:qqbar2ttbar = on"]
        if self.hadronic:
            lines += ["24:onMode = off", f"24:onIfAny = {_QUARKS}"]
        return tuple(lines)


@pydantic.dataclasses.dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class BosonJet(Recipe):
    """A W or Z boson recoiling against a parton, decaying to quarks: boosted W/Z jets."""

    kind: ClassVar[str] = "boson_jet"

    name: Name = "wjet"
    process_id: int = 4
    pthat_min_gev: PtHat = 400.0
    boson: Literal["W", "Z"] = "W"

    def process_settings(self) -> tuple[str, ...]:
        if self.boson == "W":
            return (
                "WeakBosonAndParton:qqbar2Wg = on",
                "WeakBosonAndParton:qg2Wq = on",
                "24:onMode = off",
                f"24:onIfAny = {_QUARKS}",
            )
        return (
            "WeakBosonAndParton:qqbar2gmZg = on",
            "WeakBosonAndParton:qg2gmZq = on",
            "WeakZ0:gmZmode = 2",
            "23:onMode = off",
            f"23:onIfAny = {_QUARKS}",
        )


@pydantic.dataclasses.dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class MinimumBias(Recipe):
    """Inelastic non-diffractive pp (``SoftQCD:nonDiffractive``), MPI on; also the pileup."""

    kind: ClassVar[str] = "minimum_bias"

    name: Name = "minbias"
    process_id: int = 10
    mpi: bool = True

    def process_settings(self) -> tuple[str, ...]:
        return ("SoftQCD:nonDiffractive = on",)


@pydantic.dataclasses.dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class InclusiveQCD(Recipe):
    """Inclusive non-diffractive pp, from minimum bias up to TeV jets, in two stitched
    slices of the hardest scatter's pT-hat (Pythia's ``main322`` mode 5):

    - soft: ``SoftQCD:nonDiffractive`` events whose hardest interaction has pT-hat below
      ``pthat_split_gev`` (the rest are vetoed; the slice's cross section is Pythia's
      non-diffractive one times the share kept);
    - hard: ``HardQCD:all`` above ``pthat_split_gev`` with Pythia's biased sampling
      (``PhaseSpace:bias2Selection``, weight ``(pthat_split_gev / pT-hat)^bias_power``),
      so that TeV jets are as common in the sample as 100 GeV ones.

    ``hard_share`` of the events come from the hard slice. The generator turns the two
    into one weighted sample of interactions (``EventGenerator``): an event's weight is
    the cross section it stands for; with pileup premixed, the weight of a bunch crossing
    is the share of all crossings it stands for, summed over which of its interactions
    could have been the sampled one. MPI is on: the underlying event matters at L1.

    ``pileup_tilt_per_gev`` > 0 makes busy pileup common too: half the crossings draw
    their pileup from the library with probability ``exp(tilt * scalar pT sum)``, and the
    weights undo it (``crossing_weights``). At 0.003-0.004 per GeV the L1 HT path gets
    2.6-5.5x the effective events; the L1 anomaly score's tail is not busy pileup, and
    gains nothing (benchmarks/RESULTS.md).
    """

    kind: ClassVar[str] = "inclusive_qcd"

    name: Name = "inclusive"
    process_id: int = 16
    mpi: bool = True
    pthat_split_gev: Annotated[float, Field(gt=0)] = 20.0
    bias_power: Annotated[float, Field(ge=0)] = 4.0
    hard_share: Annotated[float, Field(gt=0, lt=1)] = 0.5
    pileup_tilt_per_gev: Annotated[float, Field(ge=0, le=1)] = 0.0
    #: truth process id of the soft slice's events (the hard ones get ``process_id``).
    soft_process_id: int = 10

    @model_validator(mode="after")
    def _split_not_range(self) -> InclusiveQCD:
        if self.pthat_min_gev or self.pthat_max_gev >= 0:
            raise ValueError("inclusive QCD sets its pT-hat range with pthat_split_gev")
        return self

    def process_settings(self) -> tuple[str, ...]:
        """The hard slice's lines (the soft slice is ``soft_recipe()``)."""
        lines = ["HardQCD:all = on", f"PhaseSpace:pTHatMin = {self.pthat_split_gev:g}"]
        if self.bias_power > 0:
            lines += [
                "PhaseSpace:bias2Selection = on",
                f"PhaseSpace:bias2SelectionPow = {self.bias_power:g}",
                f"PhaseSpace:bias2SelectionRef = {self.pthat_split_gev:g}",
            ]
        return tuple(lines)

    def soft_recipe(self) -> MinimumBias:
        """The soft slice's generator settings (before the pT-hat veto)."""
        return MinimumBias(
            name=f"{self.name}-soft",
            process_id=self.soft_process_id,
            ecm_gev=self.ecm_gev,
            mpi=self.mpi,
            isr=self.isr,
            fsr=self.fsr,
            hadron_decays=self.hadron_decays,
        )


@pydantic.dataclasses.dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class L1Background(Recipe):
    """The L1 background: the hard tail of minimum bias (QCD 2->2 above ``pthat_min_gev``,
    MPI on) kept only if it has an isolated e/gamma or muon above 10 GeV or an L1 jet above
    30 GeV.

    ``minbias`` with the same filter keeps only 0.4% of events (0.7 events/s per core);
    starting from pT-hat > 20 GeV keeps 28% and runs about 30 times faster. The price is
    the few filtered events whose hardest scatter is below 20 GeV (see benchmarks).
    """

    kind: ClassVar[str] = "l1_background"

    name: Name = "l1bkg"
    process_id: int = 11
    mpi: bool = True
    pthat_min_gev: PtHat = 20.0
    event_filter: EventFilter = field(
        default_factory=lambda: EventFilter(lepton_pt_gev=10.0, jet_pt_gev=30.0)
    )

    def process_settings(self) -> tuple[str, ...]:
        return ("HardQCD:all = on",)


@pydantic.dataclasses.dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class ScalarToFourLeptons(Recipe):
    """A neutral scalar A (Pythia's h, PDG 25, re-massed) -> Z* Z* -> 4 leptons (e, mu),
    produced in gluon fusion; the L1 signal of Govorkova et al. with m(A) = 50 GeV.

    The decay uses Pythia's own H -> ZZ width (``onIfMatch``), which handles both Z bosons
    off shell; a fixed-ratio channel (``meMode`` 100) gives a vanishing cross section here.
    """

    kind: ClassVar[str] = "scalar_4l"

    name: Name = "a4l"
    process_id: int = 12
    is_signal: bool = True
    mpi: bool = True
    m_a_gev: float = 50.0

    def process_settings(self) -> tuple[str, ...]:
        return (
            "HiggsSM:gg2H = on",
            f"25:m0 = {self.m_a_gev:g}",
            "25:onMode = off",
            "25:onIfMatch = 23 23",
            "23:onMode = off",
            "23:onIfAny = 11 13",
        )


@pydantic.dataclasses.dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class HiggsTauTau(Recipe):
    """Higgs (gluon fusion) -> tau tau, taus decayed by Pythia (needs hadron decays)."""

    kind: ClassVar[str] = "higgs_tautau"

    name: Name = "htautau"
    process_id: int = 13
    is_signal: bool = True
    mpi: bool = True
    m_h_gev: float = 125.0

    def process_settings(self) -> tuple[str, ...]:
        return (
            "HiggsSM:gg2H = on",
            f"25:m0 = {self.m_h_gev:g}",
            "25:onMode = off",
            "25:onIfMatch = 15 -15",
        )


@pydantic.dataclasses.dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class WToLepton(Recipe):
    """Inclusive W -> e nu or mu nu (``WeakSingleBoson:ffbar2W``)."""

    kind: ClassVar[str] = "w_lnu"

    name: Name = "wlnu"
    process_id: int = 14
    is_signal: bool = True
    mpi: bool = True

    def process_settings(self) -> tuple[str, ...]:
        return ("WeakSingleBoson:ffbar2W = on", "24:onMode = off", "24:onIfAny = 11 13")


@pydantic.dataclasses.dataclass(frozen=True, slots=True, kw_only=True, config=_CONFIG)
class ZToLeptons(Recipe):
    """Inclusive Z -> ee or mu mu, pure Z (no photon interference)."""

    kind: ClassVar[str] = "z_ll"

    name: Name = "zll"
    process_id: int = 15
    is_signal: bool = True
    mpi: bool = True

    def process_settings(self) -> tuple[str, ...]:
        return (
            "WeakSingleBoson:ffbar2gmZ = on",
            "WeakZ0:gmZmode = 2",
            "23:onMode = off",
            "23:onIfAny = 11 13",
        )


def _registry(*recipes: Recipe) -> dict[str, Recipe]:
    out: dict[str, Recipe] = {}
    for recipe in recipes:
        if recipe.name in out or any(r.process_id == recipe.process_id for r in out.values()):
            msg = f"duplicate recipe name or process id: {recipe.name}"
            raise ValueError(msg)
        out[recipe.name] = recipe
    return out


#: The named default recipes. Jet-level: qcd, wprime, wprime3p, ttbar, wjet, zjet.
#: L1-level: minbias, l1bkg (background); a4l, htautau, wlnu, zll (signals). Bunch
#: crossings: inclusive (weighted; with premixed pileup in the source).
PROCESSES: Mapping[str, Recipe] = _registry(
    QCDDijet(description="QCD dijets, pT-hat > 1 TeV (LHCO background-like)"),
    WprimeXY(description="W'(3.5 TeV) -> X(500 GeV) Y(100 GeV), X,Y -> qq (LHCO R&D signal)"),
    WprimeXY(
        name="wprime3p",
        process_id=2,
        x_prongs=3,
        y_prongs=3,
        description="W' -> X Y with three-prong X and Y (unseen-signal test)",
    ),
    TopPair(description="all-hadronic ttbar, pT-hat > 400 GeV (top jets)"),
    BosonJet(description="W(->qq) + jet, pT-hat > 400 GeV (W jets)"),
    BosonJet(name="zjet", process_id=5, boson="Z", description="Z(->qq) + jet (Z jets)"),
    MinimumBias(description="non-diffractive minimum bias with MPI (also the pileup)"),
    L1Background(description="hard tail of minimum bias with a lepton-or-jet L1 filter"),
    ScalarToFourLeptons(description="A(50 GeV) -> ZZ* -> 4 leptons (L1 signal)"),
    HiggsTauTau(description="gg -> H(125) -> tau tau (L1 signal)"),
    WToLepton(description="W -> l nu (L1 signal)"),
    ZToLeptons(description="Z -> l l (L1 signal)"),
    InclusiveQCD(
        description="inclusive non-diffractive pp: minimum bias below pT-hat 20 GeV, "
        "pT^4-biased QCD 2->2 above (weighted; the bunch-crossing sample)"
    ),
)


def make_recipe(name: str, **changes: Any) -> Recipe:
    """The named recipe from ``PROCESSES`` with fields replaced, e.g. ``m_x_gev=300``.

    Raises:
        KeyError: unknown name (the message lists the known ones).
        ValueError: an unknown field or an invalid value.
    """
    try:
        base = PROCESSES[name]
    except KeyError:
        msg = f"unknown process {name!r}; known: {', '.join(PROCESSES)}"
        raise KeyError(msg) from None
    known = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(changes) - known)
    if unknown:
        msg = f"process {name!r} has no parameter(s) {unknown}; it has {sorted(known)}"
        raise ValueError(msg)
    return dataclasses.replace(base, **changes)


def parse_parameter(recipe: Recipe, text: str) -> tuple[str, Any]:
    """Parse ``"key=value"`` into a typed field change for ``recipe`` (for command lines).

    Booleans accept true/false/on/off/1/0; tuples take comma-separated values.
    """
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    fields = {f.name: f for f in dataclasses.fields(recipe)}
    if not sep or key not in fields:
        msg = f"expected KEY=VALUE with KEY one of {sorted(fields)}, got {text!r}"
        raise ValueError(msg)
    current = getattr(recipe, key)
    value: Any
    if isinstance(current, bool):
        lowered = raw.lower()
        if lowered not in ("true", "false", "on", "off", "1", "0"):
            msg = f"{key} is a flag: use true or false, got {raw!r}"
            raise ValueError(msg)
        value = lowered in ("true", "on", "1")
    elif isinstance(current, int):
        value = int(raw)
    elif isinstance(current, float):
        value = float(raw)
    elif isinstance(current, tuple):
        items = [x.strip() for x in raw.split(",") if x.strip()]
        value = tuple(float(x) for x in items) if key == "mass_window" else tuple(items)
    elif isinstance(current, str):
        value = raw
    else:
        msg = f"{key} cannot be set from the command line"
        raise ValueError(msg)
    return key, value
