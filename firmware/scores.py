"""Anomaly scores from the VAE's latent parameters or its reconstruction (numpy only).

Where the score is computed: the firmware (and its emulator) outputs mu and log sigma^2
as fixed-point numbers; R_z and the other scores are computed on the host, in float64,
from those exact values. On a board the same two lines of arithmetic would follow the
encoder (or run in the trigger's downstream logic); the accept decision uses only these.
"""

from __future__ import annotations

import numpy as np


def r_z(mu: np.ndarray, log_var: np.ndarray) -> np.ndarray:
    """R_z = sum_i mu_i^2 / sigma_i^2 with sigma^2 = exp(log sigma^2), per event (float64).

    Very negative log sigma^2 gives +inf rather than a warning.

    Example:
        >>> r_z(np.array([[1.0, 2.0]]), np.array([[0.0, np.log(4.0)]])).tolist()
        [2.0]
    """
    mu64 = np.asarray(mu, np.float64)
    with np.errstate(over="ignore"):
        inverse_var = np.exp(-np.asarray(log_var, np.float64))
    with np.errstate(invalid="ignore"):
        terms = np.where(mu64 == 0, 0.0, mu64**2 * inverse_var)
    return terms.sum(axis=1)


def sum_mu2(mu: np.ndarray) -> np.ndarray:
    """The AXOL1TL-style score sum_i mu_i^2 (float64)."""
    mu64 = np.asarray(mu, np.float64)
    return (mu64**2).sum(axis=1)


def masked_mse(inputs: np.ndarray, reconstruction: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean squared error over the unmasked inputs of each event (the VAE's reco loss).

    An event with no real object scores 0.
    """
    mask64 = np.asarray(mask, np.float64)
    squared = (np.asarray(inputs, np.float64) - np.asarray(reconstruction, np.float64)) ** 2
    count = mask64.sum(axis=1)
    return (squared * mask64).sum(axis=1) / np.maximum(count, 1.0)


def kl_divergence(mu: np.ndarray, log_var: np.ndarray) -> np.ndarray:
    """KL(N(mu, sigma^2) || N(0, 1)) per event, summed over the latent dimensions."""
    mu64, lv = np.asarray(mu, np.float64), np.asarray(log_var, np.float64)
    return 0.5 * (mu64**2 + np.exp(lv) - 1.0 - lv).sum(axis=1)
