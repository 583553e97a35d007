"""Delivery receipts for records (flow snapshots): a record is kept until its store says so.

A killed consumer loses whatever it had received but not yet written, and ZeroMQ drops
the messages queued to a peer that disconnects, so a record is only safe once its
consumer has stored it. The producer stamps each record it sends with an id
(``{node}/{incarnation}/{n}``; the incarnation keeps a restarted node's ids apart from
its predecessor's) and keeps it in ``UnconfirmedRecords``. The consumer publishes the
id once the record is handled (``receipt_frames``), on a PUB socket that the producers
subscribe to, by their own id prefix. A record with no receipt after ``resend_after_s``
is sent again, so the consumer must treat a second copy as a duplicate (the archive
does, by the snapshot's file name).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from stream.batch import Record

#: The ``meta`` key that carries a record's id.
RECORD_ID_KEY = "record_id"


def new_prefix(node: str) -> str:
    """The id prefix of one incarnation of ``node`` (also its receipt subscription)."""
    return f"{node}/{uuid.uuid4().hex[:12]}/"


def stamped(record: Record, record_id: str) -> Record:
    """``record`` with its id in ``meta``."""
    return dataclasses.replace(record, meta={**record.meta, RECORD_ID_KEY: record_id})


def record_id(record: Record) -> str | None:
    """The id a producer stamped on ``record`` (None: it asks for no receipt)."""
    value = record.meta.get(RECORD_ID_KEY)
    return value if isinstance(value, str) and value else None


def receipt_frames(stored_id: str) -> list[bytes]:
    """The one-frame PUB message that confirms ``stored_id`` (its prefix is the topic)."""
    return [stored_id.encode()]


def receipt_id(frames: list[bytes]) -> str | None:
    """The id a receipt confirms (None: not a receipt)."""
    if len(frames) != 1:
        return None
    try:
        return frames[0].decode()
    except UnicodeDecodeError:
        return None


@dataclass(slots=True)
class _Pending:
    port: str
    record: Record
    sent_at: float


class UnconfirmedRecords:
    """The records a node sent and no receipt has confirmed yet, oldest first.

    At most ``capacity`` are kept (a flow snapshot is tens of kB); past that the oldest is
    given up and counted in ``given_up``.
    """

    def __init__(self, resend_after_s: float, capacity: int = 256) -> None:
        self.resend_after_s = resend_after_s
        self.capacity = capacity
        self.given_up = 0
        self._pending: OrderedDict[str, _Pending] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pending)

    def sent(self, port: str, record: Record, now: float) -> None:
        """Remember a record that was just sent (again) on ``port``."""
        stored_id = record_id(record)
        if stored_id is None:
            return
        self._pending.pop(stored_id, None)
        self._pending[stored_id] = _Pending(port, record, now)
        while len(self._pending) > self.capacity:
            self._pending.popitem(last=False)
            self.given_up += 1

    def discard(self, stored_id: str) -> bool:
        """Forget a record (its store confirmed it, or it was counted lost); False if it
        was not pending."""
        return self._pending.pop(stored_id, None) is not None

    def due(self, now: float) -> list[tuple[str, Record]]:
        """(port, record) of every record unconfirmed for ``resend_after_s``, oldest first."""
        return [
            (p.port, p.record)
            for p in self._pending.values()
            if now - p.sent_at >= self.resend_after_s
        ]
