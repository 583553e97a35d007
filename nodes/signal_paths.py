"""Events of each signal process that a trigger stage saw, accepted and fired each path on:
the efficiencies per signal that the run report shows beside the rates.

Counts are of events (a signal process's events all carry one weight), keyed by the truth
``process_id`` of the events with ``is_signal`` set; a stage without truth counts nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import numpy as np

from stream.batch import EventBatch

#: The count of a process's events that the stage saw, beside one count per path.
SEEN = "seen"


class SignalPaths:
    """Per signal process: events seen and events on which each path fired."""

    def __init__(self) -> None:
        self._counts: dict[int, Counter[str]] = {}

    def add(self, batch: EventBatch, fired: Mapping[str, np.ndarray]) -> None:
        """Count a batch, given a boolean mask per path (``"accepted"`` among them)."""
        truth = batch.truth
        if "is_signal" not in truth or "process_id" not in truth:
            return
        signal = np.asarray(truth["is_signal"], bool)
        if not signal.any():
            return
        process = np.asarray(truth["process_id"], np.int64)
        for pid in np.unique(process[signal]).tolist():
            rows = signal & (process == pid)
            counts = self._counts.setdefault(int(pid), Counter())
            counts[SEEN] += int(rows.sum())
            for path, mask in fired.items():
                counts[path] += int((rows & mask).sum())

    def report(self) -> dict[str, dict[str, int]]:
        """``{process_id: {"seen": n, path: n, ...}}`` with string keys (JSON)."""
        return {str(pid): dict(counts) for pid, counts in sorted(self._counts.items())}
