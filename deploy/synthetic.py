"""Synthetic roles for the farm machinery: random schema-shaped batches through relays into
a sink (``stream.testing`` fakes). They exercise the launcher, the wire and the
accounting, not physics; ``deploy/topologies/synthetic.toml`` runs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import pydantic
from pydantic import ConfigDict, Field

from stream.node import Processor, Producer
from stream.testing import ListSource, RecordingSink, Relay, synthetic_batch


@pydantic.dataclasses.dataclass(frozen=True, slots=True, config=ConfigDict(extra="forbid"))
class SyntheticSourceConfig:
    """A source of random schema-shaped batches; ``rate_hz`` in events per second (0: as
    fast as the outputs take them)."""

    events: Annotated[int, Field(ge=1)] = 10_000
    batch_size: Annotated[int, Field(ge=1)] = 256
    rate_hz: Annotated[float, Field(ge=0)] = 0.0


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """A relay forwards every batch (``stream.testing.Relay``)."""


@dataclass(frozen=True, slots=True)
class SinkConfig:
    """A sink accepts every event; ``ids_path`` saves the (run, event) pairs it saw."""

    ids_path: str = ""


def synthetic_source(config: SyntheticSourceConfig, *, name: str) -> Producer:
    del name
    sizes = [config.batch_size] * (config.events // config.batch_size)
    if config.events % config.batch_size:
        sizes.append(config.events % config.batch_size)
    batches = (
        synthetic_batch(size, first_event=i * config.batch_size, seed=i)
        for i, size in enumerate(sizes)
    )
    return ListSource(batches, rate_hz=config.rate_hz / config.batch_size)  # batches per second


def relay(config: RelayConfig, *, name: str) -> Processor:
    del config, name
    return Relay()


def sink(config: SinkConfig, *, name: str) -> Processor:
    del name
    return RecordingSink(config.ids_path or None)
