"""Jagged particle lists as flat numpy arrays plus per-event counts.

Every stage between Pythia and the ``EventBatch`` works on whole batches of events at
once: one flat array per quantity and ``counts`` saying how many entries each event has.
This keeps the per-particle work in numpy (and in FastJet's C++ for clustering).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Particles:
    """Four-momenta (GeV) of a batch of events, flat, with optional PDG id and charge.

    ``counts[i]`` particles belong to event ``i``, stored consecutively.
    """

    counts: np.ndarray
    px: np.ndarray
    py: np.ndarray
    pz: np.ndarray
    e: np.ndarray
    pid: np.ndarray | None = None
    charge: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = int(self.counts.sum())
        for name in ("px", "py", "pz", "e", "pid", "charge"):
            array = getattr(self, name)
            if array is not None and array.shape != (n,):
                msg = f"{name} has shape {array.shape}, counts sum to {n}"
                raise ValueError(msg)

    @property
    def n_events(self) -> int:
        return int(self.counts.size)

    @property
    def event_index(self) -> np.ndarray:
        """The event each particle belongs to."""
        return np.repeat(np.arange(self.counts.size), self.counts)

    @property
    def offsets(self) -> np.ndarray:
        """``offsets[i]:offsets[i+1]`` slices event ``i``."""
        return np.concatenate([[0], np.cumsum(self.counts)])

    @property
    def pt(self) -> np.ndarray:
        return np.hypot(self.px, self.py)

    @property
    def scalar_pt_sum(self) -> np.ndarray:
        """Each event's scalar sum of particle pT (GeV): how busy it is."""
        return np.bincount(self.event_index, self.pt, minlength=self.n_events)

    @property
    def phi(self) -> np.ndarray:
        return np.arctan2(self.py, self.px)

    @property
    def eta(self) -> np.ndarray:
        return pseudorapidity(self.px, self.py, self.pz)

    def select(self, mask: np.ndarray) -> Particles:
        """The particles where ``mask`` is true, counts updated."""
        counts = np.bincount(self.event_index[mask], minlength=self.n_events)
        return Particles(
            counts,
            self.px[mask],
            self.py[mask],
            self.pz[mask],
            self.e[mask],
            None if self.pid is None else self.pid[mask],
            None if self.charge is None else self.charge[mask],
        )

    def take_events(self, keep: np.ndarray) -> Particles:
        """The events where the boolean ``keep`` is true, with all their particles."""
        mask = np.repeat(keep, self.counts)
        return Particles(
            self.counts[keep],
            self.px[mask],
            self.py[mask],
            self.pz[mask],
            self.e[mask],
            None if self.pid is None else self.pid[mask],
            None if self.charge is None else self.charge[mask],
        )

    @staticmethod
    def from_pt_eta_phi(
        counts: np.ndarray, pt: np.ndarray, eta: np.ndarray, phi: np.ndarray, mass: np.ndarray
    ) -> Particles:
        """Build from (pT, eta, phi, m)."""
        px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
        e = np.sqrt(px * px + py * py + pz * pz + mass * mass)
        return Particles(np.asarray(counts, np.int64), px, py, pz, e)

    @staticmethod
    def concat_events(parts: list[Particles]) -> Particles:
        """Merge particle lists event by event (same number of events in each part)."""
        n_events = parts[0].n_events
        if any(p.n_events != n_events for p in parts):
            raise ValueError("cannot merge particle lists with different numbers of events")
        index = np.concatenate([p.event_index for p in parts])
        order = np.argsort(index, kind="stable")

        def cat(name: str) -> np.ndarray | None:
            arrays = [getattr(p, name) for p in parts]
            if any(a is None for a in arrays):
                return None
            return np.concatenate(arrays)[order]

        px, py, pz, e = (cat(n) for n in ("px", "py", "pz", "e"))
        assert px is not None and py is not None and pz is not None and e is not None
        counts = np.sum([p.counts for p in parts], axis=0)
        return Particles(counts, px, py, pz, e, cat("pid"), cat("charge"))


def pseudorapidity(px: np.ndarray, py: np.ndarray, pz: np.ndarray) -> np.ndarray:
    """eta = asinh(pz / pT), finite for pT > 0 (a particle along the beam gets +-20)."""
    pt = np.hypot(px, py)
    with np.errstate(divide="ignore", invalid="ignore"):
        eta = np.arcsinh(np.where(pt > 0, pz / np.where(pt > 0, pt, 1.0), np.sign(pz) * 1e9))
    return np.clip(eta, -20.0, 20.0)


def rapidity(e: np.ndarray, pz: np.ndarray) -> np.ndarray:
    """y = 0.5 ln((E + pz) / (E - pz)), clipped for massless particles along the beam."""
    with np.errstate(divide="ignore", invalid="ignore"):
        y = 0.5 * np.log(np.maximum(e + pz, 1e-12) / np.maximum(e - pz, 1e-12))
    return np.clip(y, -20.0, 20.0)


def delta_phi(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """phi difference wrapped to [-pi, pi)."""
    return (a - b + np.pi) % (2 * np.pi) - np.pi
