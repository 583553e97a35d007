"""Receipts: a record stays with its producer until its store confirms it."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import zmq

from stream.batch import Message, Record
from stream.node import Emit, Node, NodeConfig, Outcome, Processor, Producer
from stream.receipts import UnconfirmedRecords, receipt_id, record_id, stamped
from stream.transport import free_tcp_port


def _record(i: int) -> Record:
    return Record("flow_snapshot", {"i": i}, {"theta": np.full(3, i, "<f4")})


def test_unconfirmed_records_come_due_until_discarded() -> None:
    pending = UnconfirmedRecords(resend_after_s=5.0, capacity=2)
    pending.sent("archive", _record(0), now=0.0)  # no id: asks for no receipt
    assert len(pending) == 0
    first, second = stamped(_record(1), "n/x/1"), stamped(_record(2), "n/x/2")
    pending.sent("archive", first, now=0.0)
    pending.sent("archive", second, now=3.0)
    assert [record_id(r) for _, r in pending.due(4.9)] == []
    assert [record_id(r) for _, r in pending.due(5.0)] == ["n/x/1"]
    pending.sent("archive", first, now=5.0)  # sent again: its clock restarts
    assert [record_id(r) for _, r in pending.due(8.0)] == ["n/x/2"]
    assert pending.discard("n/x/2") and not pending.discard("n/x/2")
    pending.sent("archive", stamped(_record(3), "n/x/3"), now=9.0)
    pending.sent("archive", stamped(_record(4), "n/x/4"), now=9.0)
    assert len(pending) == 2 and pending.given_up == 1  # the oldest, n/x/1, given up


class _Records(Producer):
    """Emits ``n`` records, one per call, then stops."""

    def __init__(self, n: int) -> None:
        self._left = n

    def wait_s(self, now_s: float) -> float:
        return 0.0

    def produce(self) -> Outcome | None:
        if self._left == 0:
            return None
        self._left -= 1
        return Outcome(emits=(Emit("out", _record(self._left)),))


class _ForgetfulStore(Processor):
    """Fails on the first copy of each record (as if killed before writing it)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.stored: list[str] = []

    def process(self, message: Message) -> Outcome:
        assert isinstance(message, Record)
        stored_id = str(record_id(message))
        if stored_id not in self.seen:
            self.seen.add(stored_id)
            raise OSError("disk went away")
        self.stored.append(stored_id)
        return Outcome()


def _run(producer: Node, store: Node) -> None:
    threads = [threading.Thread(target=n.run, daemon=True) for n in (store, producer)]
    threads[0].start()
    assert store.wait_started(10)
    threads[1].start()
    threads[1].join(60)
    assert not threads[1].is_alive(), "the producer did not stop"
    store.request_stop()
    threads[0].join(30)


def _nodes(*, confirm: bool, store: Processor) -> tuple[Node, Node]:
    ctx: zmq.SyncContext = zmq.Context.instance()
    data, receipts = free_tcp_port(), free_tcp_port()
    timing: dict[str, Any] = {
        "heartbeat_interval_s": 0.1,
        "stall_after_s": 3.0,
        "resend_unconfirmed_s": 0.5,
    }
    producer = Node(
        NodeConfig(
            "hlt-0",
            "hlt",
            outputs={"out": f"@tcp://127.0.0.1:{data}"},
            receipts_from=(f"tcp://127.0.0.1:{receipts}",),
            **timing,
        ),
        _Records(3),
        context=ctx,
    )
    consumer = Node(
        NodeConfig(
            "archive-0",
            "archive",
            inputs=(f"tcp://127.0.0.1:{data}",),
            receipts_to=f"@tcp://127.0.0.1:{receipts}" if confirm else None,
            drain_idle_s=0.3,
            **timing,
        ),
        store,
        context=ctx,
    )
    return producer, consumer


def test_a_record_its_store_failed_on_is_sent_again_and_confirmed() -> None:
    store = _ForgetfulStore()
    producer, consumer = _nodes(confirm=True, store=store)
    _run(producer, consumer)
    assert sorted(store.stored) == sorted(store.seen) and len(store.stored) == 3
    assert all(i.startswith("hlt-0/") for i in store.stored)
    assert sum(producer.stats.records_resent.values()) == 3
    assert producer.stats.records_out["out"] == 6  # every copy on the wire
    assert producer.stats.records_unconfirmed == 0
    assert consumer.stats.records_in == 6


class _Store(Processor):
    def __init__(self) -> None:
        self.stored = 0

    def process(self, message: Message) -> Outcome:
        self.stored += 1
        return Outcome()


def test_records_no_store_confirms_are_counted_unconfirmed_at_the_stop() -> None:
    store = _Store()
    producer, consumer = _nodes(confirm=False, store=store)
    _run(producer, consumer)
    assert producer.stats.records_unconfirmed == 3
    assert store.stored >= 3  # delivered, resent, yet never confirmed


def test_a_malformed_receipt_is_ignored_not_fatal() -> None:
    assert receipt_id([b"hlt-0/x/1"]) == "hlt-0/x/1"
    assert receipt_id([b"\xff\xfe"]) is None  # not UTF-8
    assert receipt_id([b"hlt-0/x/1", b"extra"]) is None
    assert receipt_id([]) is None
