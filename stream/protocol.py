"""Control-plane messages: node heartbeats published on the control socket."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack

from stream.errors import FrameError

HEARTBEAT_TOPIC = b"hb"


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A node's liveness and counters, published every ``heartbeat_interval_s``.

    ``state`` is ``starting``, ``running``, ``draining`` or ``stopped``; the last
    heartbeat of a node says ``stopped`` and carries its final counters.
    """

    name: str
    role: str
    state: str
    seq: int
    uptime_s: float
    stats: dict[str, Any] = field(default_factory=dict)
    metrics_port: int | None = None

    def to_frames(self) -> list[bytes]:
        """The topic frame and the msgpack body."""
        return [HEARTBEAT_TOPIC, msgpack.packb(asdict(self))]

    @classmethod
    def from_frames(cls, frames: list[bytes]) -> Heartbeat:
        """Parse a heartbeat; raises ``FrameError`` on anything else."""
        if len(frames) != 2 or frames[0] != HEARTBEAT_TOPIC:
            raise FrameError("decode_error", "not a heartbeat message")
        try:
            body = msgpack.unpackb(frames[1], raw=False)
            return cls(**body)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise FrameError("decode_error", f"bad heartbeat body ({exc})") from exc
