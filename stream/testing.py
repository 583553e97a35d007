"""Fakes shipped with the package for tests, demos and benchmarks: sources, relays, sinks, clocks.

``synthetic_batch`` fills the schema's shapes with random numbers. It exercises the wire
and the runtime only; it is not physics (``simulator`` makes real events).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stream.batch import EventBatch, Message
from stream.node import Emit, Node, NodeConfig, Outcome, Processor, Producer
from stream.schema import N_CONSTITUENTS, N_FATJETS, N_FEATURES, N_L1_OBJECTS


def synthetic_batch(
    n_events: int, *, first_event: int = 0, run: int = 1, lumi: int = 1, seed: int = 0
) -> EventBatch:
    """A batch with every main column of the schema filled with random numbers of the right
    shape (L1 objects 19x3, 2 jets x 128 constituents x 4, 8 features)."""
    rng = np.random.default_rng(seed)
    f4 = np.float32
    return EventBatch(
        {
            "run": np.full(n_events, run, "<u4"),
            "lumi": np.full(n_events, lumi, "<u4"),
            "event": np.arange(first_event, first_event + n_events, dtype="<u8"),
            "l1_objects": rng.random((n_events, N_L1_OBJECTS, 3), f4),
            "fatjets": rng.random((n_events, N_FATJETS, 4), f4),
            "constituents": rng.random((n_events, N_FATJETS, N_CONSTITUENTS, 4), f4),
            "n_constituents": rng.integers(1, N_CONSTITUENTS, (n_events, N_FATJETS), "<i2"),
            "features": rng.random((n_events, N_FEATURES), f4),
        },
        truth={"is_signal": np.zeros(n_events, "u1"), "process_id": np.zeros(n_events, "<i2")},
    )


class ListSource(Producer):
    """Emits the given batches on port ``out``, then stops."""

    def __init__(self, batches: Iterable[EventBatch], *, rate_hz: float = 0.0) -> None:
        self._batches: Iterator[EventBatch] = iter(batches)
        self._interval_s = 1.0 / rate_hz if rate_hz > 0 else 0.0
        self._next_s: float | None = None

    def wait_s(self, now_s: float) -> float:
        if self._next_s is None or self._interval_s == 0:
            self._next_s = now_s
            return 0.0
        return max(0.0, self._next_s - now_s)

    def produce(self) -> Outcome | None:
        batch = next(self._batches, None)
        if batch is None:
            return None
        if self._next_s is not None:
            self._next_s += self._interval_s
        return Outcome(emits=(Emit("out", batch),), accepted=len(batch))


class SyntheticSource(ListSource):
    """``n_batches`` synthetic batches of ``batch_size`` events with consecutive event numbers."""

    def __init__(self, n_batches: int, batch_size: int, *, rate_hz: float = 0.0) -> None:
        batches = (
            synthetic_batch(batch_size, first_event=i * batch_size, seed=i)
            for i in range(n_batches)
        )
        super().__init__(batches, rate_hz=rate_hz)


class Relay(Processor):
    """Forwards every event batch on port ``out``."""

    def process(self, message: Message) -> Outcome:
        if not isinstance(message, EventBatch):
            return Outcome()
        return Outcome(emits=(Emit("out", message),), accepted=len(message))


class RecordingSink(Processor):
    """Accepts everything and remembers the (run, event) of each event it saw.

    With ``ids_path`` it writes them as a ``.npy`` array of shape (N, 2) at finish.
    """

    def __init__(self, ids_path: str | None = None) -> None:
        self.ids: list[np.ndarray] = []
        self.records: list[Message] = []
        self._ids_path = ids_path

    def process(self, message: Message) -> Outcome:
        if not isinstance(message, EventBatch):
            self.records.append(message)
            return Outcome()
        self.ids.append(np.stack([message["run"].astype("u8"), message["event"]], axis=1))
        return Outcome(accepted=len(message))

    def finish(self) -> tuple[Emit, ...]:
        if self._ids_path is not None:
            np.save(self._ids_path, self.event_ids())
        return ()

    def event_ids(self) -> np.ndarray:
        """All (run, event) pairs seen, in arrival order."""
        return np.concatenate(self.ids) if self.ids else np.zeros((0, 2), "u8")


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start_s: float = 0.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


@dataclass(frozen=True, slots=True)
class FakeNodeSpec:
    """A picklable description of a test node, for running it in a child process."""

    config: NodeConfig
    kind: str  # "source", "relay" or "sink"
    params: tuple[tuple[str, Any], ...] = ()


def build_fake_worker(spec: FakeNodeSpec) -> Processor | Producer:
    """The worker a ``FakeNodeSpec`` names."""
    params = dict(spec.params)
    if spec.kind == "source":
        return SyntheticSource(**params)
    if spec.kind == "relay":
        return Relay()
    if spec.kind == "sink":
        return RecordingSink(**params)
    msg = f"unknown test node kind {spec.kind!r}"
    raise ValueError(msg)


def run_fake_node(spec: FakeNodeSpec) -> None:
    """Entry point for a child process: build the worker and run the node until it stops."""
    Node(spec.config, build_fake_worker(spec)).run()


def stats_of(path: str | Path) -> dict[str, Any]:
    """Read a node's final stats file."""
    return json.loads(Path(path).read_text())
