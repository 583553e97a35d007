"""The in-process interface between the HLT node and an online learner (e.g. the OnlineFlow).

The HLT hands every event it sees, accepted or not, to its learner, with truth removed.
The learner trains on the events while they are in memory and returns snapshots (as
``Record`` messages) when they are due; the HLT sends them to the archive.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from stream.batch import EventBatch, Record


class Learner(Protocol):
    """What the HLT node needs from an online learner."""

    def learn(self, batch: EventBatch) -> Sequence[Record]:
        """Learn from the batch's events (truth already stripped); return snapshots now due.

        Must account for every event: learned, or counted as not learned.
        """

    def finish(self) -> Sequence[Record]:
        """Final snapshots when the node drains."""

    def report(self) -> dict[str, Any]:
        """Figures for heartbeats and the node's final stats (events learned, not learned...)."""
