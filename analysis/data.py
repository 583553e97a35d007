"""Event inputs of the analysis: labelled test events and stored events, as features.

The analysis reads no file format itself: its callers read datasets (for example with
``simulator.replay.read_features``) or the archive (``models.archive``) and hand it arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stream.schema import FEATURE_NAMES

MJJ = FEATURE_NAMES.index("mjj")


@dataclass(frozen=True, slots=True)
class Events:
    """Features (N, 8) and, when known, truth labels (N,) of a set of events."""

    features: np.ndarray
    is_signal: np.ndarray | None = None

    @property
    def mjj(self) -> np.ndarray:
        return self.features[:, MJJ]

    def __len__(self) -> int:
        return len(self.features)

    def select(self, rows: np.ndarray) -> Events:
        labels = None if self.is_signal is None else self.is_signal[rows]
        return Events(self.features[rows], labels)

    def in_window(self, window_gev: tuple[float, float]) -> np.ndarray:
        return (self.mjj >= window_gev[0]) & (self.mjj < window_gev[1])
