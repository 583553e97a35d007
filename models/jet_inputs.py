"""ParticleNet inputs from jet constituents: 7 per-particle features, kNN coordinates, a mask.

The jet axis is the four-vector sum of the jet's real constituents, so the inputs need
nothing but the constituents (the tau-vs-QCD file has no jet four-vectors). Per real
particle: log pT, log E, log(pT/pT_jet), log(E/E_jet), ΔR, Δη, Δφ (Δφ wrapped to
[-π, π)); the first kNN runs on (Δη, Δφ). Padded slots, and slots with pT <= 0 or past
``n_constituents``, are masked out and hold zeros.

Constituents are (pT, η, φ, E) as in the event schema. ``constituents_from_eta_phi_pt``
turns the (η, φ, pT) layout of the tau-vs-QCD file into that, treating particles as
massless (E = pT cosh η).

Example:
    >>> import numpy as np
    >>> c = np.array([[[100.0, 0.1, 0.2, 101.0], [50.0, -0.1, 0.3, 51.0], [0, 0, 0, 0]]])
    >>> inputs = jet_inputs(c, n_particles=4)
    >>> inputs.features.shape, inputs.mask.tolist()
    ((1, 4, 7), [[True, True, False, False]])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

FEATURE_NAMES = (
    "log_pt",
    "log_e",
    "log_pt_rel",
    "log_e_rel",
    "delta_r",
    "delta_eta",
    "delta_phi",
)
COORDINATE_NAMES = ("delta_eta", "delta_phi")


@dataclass(frozen=True, slots=True)
class JetInputs:
    """A batch of jets ready for ParticleNet (channel-last numpy arrays).

    Attributes:
        points: (N, P, 2) float32 (Δη, Δφ) for the first kNN.
        features: (N, P, 7) float32, see ``FEATURE_NAMES``.
        mask: (N, P) bool, True for real particles.
        jet: (N, 4) float32 jet (pT, η, φ, mass) from the constituent sum.
    """

    points: np.ndarray
    features: np.ndarray
    mask: np.ndarray
    jet: np.ndarray

    def __len__(self) -> int:
        return int(self.mask.shape[0])

    @property
    def n_real(self) -> np.ndarray:
        """Real particles per jet."""
        return self.mask.sum(axis=1)

    def select(self, rows: np.ndarray | slice) -> JetInputs:
        """The jets at ``rows``."""
        return JetInputs(self.points[rows], self.features[rows], self.mask[rows], self.jet[rows])

    def trimmed(self) -> JetInputs:
        """The same jets cut to the longest one's particle count (at least 1 slot).

        Constituents are pT-ordered, so real particles come first and nothing real is lost;
        ParticleNet's output does not depend on the padding.
        """
        width = max(int(self.n_real.max(initial=0)), 1)
        if width == self.mask.shape[1]:
            return self
        return JetInputs(
            self.points[:, :width], self.features[:, :width], self.mask[:, :width], self.jet
        )

    def to_torch(self, device: str | torch.device = "cpu") -> tuple[torch.Tensor, ...]:
        """``(points, features, mask)`` tensors for ``ParticleNet.forward``."""
        return (
            torch.from_numpy(np.ascontiguousarray(self.points)).to(device),
            torch.from_numpy(np.ascontiguousarray(self.features)).to(device),
            torch.from_numpy(np.ascontiguousarray(self.mask)).to(device),
        )

    @staticmethod
    def concat(parts: list[JetInputs]) -> JetInputs:
        """Join batches padded to the same width."""
        return JetInputs(
            np.concatenate([p.points for p in parts]),
            np.concatenate([p.features for p in parts]),
            np.concatenate([p.mask for p in parts]),
            np.concatenate([p.jet for p in parts]),
        )


def constituents_from_eta_phi_pt(particles: np.ndarray) -> np.ndarray:
    """(N, P, 3) (η, φ, pT) -> (N, P, 4) (pT, η, φ, E), massless: E = pT cosh η."""
    if particles.ndim != 3 or particles.shape[-1] != 3:
        msg = f"expected (N, P, 3) (eta, phi, pT), got shape {particles.shape}"
        raise ValueError(msg)
    eta, phi, pt = (particles[..., i].astype(np.float64) for i in range(3))
    energy = pt * np.cosh(eta)
    return np.stack([pt, eta, phi, energy], axis=-1).astype(np.float32)


def _wrap(phi: np.ndarray) -> np.ndarray:
    return (phi + np.pi) % (2 * np.pi) - np.pi


def jet_inputs(
    constituents: np.ndarray,
    n_constituents: np.ndarray | None = None,
    *,
    n_particles: int = 128,
) -> JetInputs:
    """ParticleNet inputs for jets given as (N, P, 4) (pT, η, φ, E) constituents.

    Arguments:
        constituents: pT-ordered, zero-padded constituents.
        n_constituents: real constituents per jet (default: those with pT > 0).
        n_particles: output width; longer jets keep their ``n_particles`` hardest.

    Returns:
        ``JetInputs`` of width ``n_particles``; a jet with no constituents has an empty
        mask, zero features and a zero jet.
    """
    if constituents.ndim != 3 or constituents.shape[-1] != 4:
        msg = f"expected (N, P, 4) (pT, eta, phi, E) constituents, got {constituents.shape}"
        raise ValueError(msg)
    width = constituents.shape[1]
    c = constituents[:, : min(width, n_particles)].astype(np.float64)
    pt, eta, phi, energy = c[..., 0], c[..., 1], c[..., 2], c[..., 3]
    mask = pt > 0
    if n_constituents is not None:
        mask &= np.arange(c.shape[1]) < np.asarray(n_constituents).reshape(-1, 1)
    pt, eta, phi = np.where(mask, pt, 0.0), np.where(mask, eta, 0.0), np.where(mask, phi, 0.0)
    energy = np.where(mask, np.maximum(energy, pt), 0.0)

    px, py = (pt * np.cos(phi)).sum(1), (pt * np.sin(phi)).sum(1)
    pz, jet_e = (pt * np.sinh(eta)).sum(1), energy.sum(1)
    jet_pt = np.hypot(px, py)
    has = jet_pt > 0
    safe_pt = np.where(has, jet_pt, 1.0)
    jet_eta = np.where(has, np.arcsinh(pz / safe_pt), 0.0)
    jet_phi = np.arctan2(py, px)
    jet_mass = np.sqrt(np.maximum(jet_e**2 - jet_pt**2 - pz**2, 0.0))

    d_eta = np.where(mask, eta - jet_eta[:, None], 0.0)
    d_phi = np.where(mask, _wrap(phi - jet_phi[:, None]), 0.0)
    tiny = 1e-8
    log_pt = np.log(np.maximum(pt, tiny))
    log_e = np.log(np.maximum(energy, tiny))
    features = np.stack(
        [
            log_pt,
            log_e,
            log_pt - np.log(safe_pt)[:, None],
            log_e - np.log(np.where(jet_e > 0, jet_e, 1.0))[:, None],
            np.hypot(d_eta, d_phi),
            d_eta,
            d_phi,
        ],
        axis=-1,
    )
    features *= mask[..., None]
    points = np.stack([d_eta, d_phi], axis=-1)

    pad = n_particles - c.shape[1]
    if pad > 0:
        features = np.pad(features, ((0, 0), (0, pad), (0, 0)))
        points = np.pad(points, ((0, 0), (0, pad), (0, 0)))
        mask = np.pad(mask, ((0, 0), (0, pad)))
    jet = np.stack([jet_pt, jet_eta, jet_phi, jet_mass], axis=-1)
    return JetInputs(
        points.astype(np.float32),
        features.astype(np.float32),
        mask,
        jet.astype(np.float32),
    )
