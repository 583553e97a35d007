"""The node runtime with real ZeroMQ sockets: bad input is counted and the node carries on."""

from __future__ import annotations

import re
from collections.abc import Callable

import msgpack
import numpy as np
import pytest
import zmq
from prometheus_client import REGISTRY

from stream import (
    Emit,
    EventBatch,
    Heartbeat,
    Message,
    Node,
    NodeConfig,
    Outcome,
    Processor,
    Record,
    encode,
)
from stream.schema import SCHEMA_VERSION
from stream.testing import ListSource, Relay, synthetic_batch
from stream.transport import Endpoint, SocketOptions, recv_message, send_message
from tests.stream.conftest import running


def relay_node(name: str, *, control: str | None = None) -> Node:
    config = NodeConfig(
        name=name,
        role="relay",
        inputs=(f"@inproc://{name}-in",),
        outputs={"out": f"@inproc://{name}-out"},
        drain_idle_s=0.2,
        heartbeat_interval_s=0.1,
        control=control,
    )
    return Node(config, Relay(), context=zmq.Context.instance())


def _with_header(frames: list, **changes: object) -> list:
    return [msgpack.packb(msgpack.unpackb(frames[0]) | changes), *frames[1:]]


def _metric(name: str, node: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, {"node": node, "role": "relay", **labels})
    return 0.0 if value is None else value


def test_bad_frames_are_counted_and_the_node_carries_on() -> None:
    ctx: zmq.SyncContext = zmq.Context.instance()
    node = relay_node("bad-input")
    with running(node):
        push = ctx.socket(zmq.PUSH)
        push.connect("inproc://bad-input-in")
        pull = ctx.socket(zmq.PULL)
        pull.connect("inproc://bad-input-out")
        nan_batch = synthetic_batch(5, first_event=100)
        features = nan_batch["features"].copy()
        features[0, 0] = np.nan
        future = _with_header(list(encode(synthetic_batch(3))), v=SCHEMA_VERSION + 1)
        push.send_multipart(encode(synthetic_batch(4)))
        push.send_multipart([b"\x00\xffnot msgpack"])
        push.send_multipart(encode(nan_batch.with_columns(features=features)))
        push.send_multipart(future)
        push.send_multipart(list(encode(synthetic_batch(6)))[:-1])  # truncated
        push.send_multipart(encode(synthetic_batch(2, first_event=200)))
        received = [recv_message(pull, timeout_ms=5000) for _ in range(3)]
        push.close(0)
        pull.close(0)
    assert [len(b) for b in received if isinstance(b, EventBatch)] == [4, 4, 2]
    stats = node.stats
    # 4 + 1 (unreadable) + 5 (one NaN) + 3 (future version, count backed by its buffers)
    # + 1 (truncated: its count cannot be checked) + 2
    assert stats.events_in == 16
    assert stats.dropped == {"decode_error": 5, "nonfinite": 1}
    assert stats.accepted == 10 and stats.balanced


def test_a_nonfinite_event_drops_that_event_only() -> None:
    ctx: zmq.SyncContext = zmq.Context.instance()
    node = relay_node("nonfinite")
    batch = synthetic_batch(6, first_event=10)
    signal = np.array([0, 1, 0, 1, 0, 1], "u1")
    truth = {"is_signal": signal, "process_id": np.arange(6, dtype="<i2")}
    batch = EventBatch(batch.columns, truth)
    constituents = batch["constituents"].copy()
    constituents[1, 0, 5, 0] = np.inf
    features = batch["features"].copy()
    features[4, 7] = np.nan
    score = np.full(6, np.nan, "<f4")  # l1_score is not schema-finite: NaN travels
    all_bad = synthetic_batch(3, first_event=50)
    all_bad_features = np.full_like(all_bad["features"], np.nan)
    with running(node):
        push = ctx.socket(zmq.PUSH)
        push.connect("inproc://nonfinite-in")
        pull = ctx.socket(zmq.PULL)
        pull.connect("inproc://nonfinite-out")
        push.send_multipart(
            encode(batch.with_columns(constituents=constituents, features=features, l1_score=score))
        )
        push.send_multipart(encode(all_bad.with_columns(features=all_bad_features)))
        push.send_multipart(encode(synthetic_batch(2, first_event=90)))
        received = [recv_message(pull, timeout_ms=5000) for _ in range(2)]
        push.close(0)
        pull.close(0)
    kept, last = received
    assert isinstance(kept, EventBatch) and isinstance(last, EventBatch)
    assert kept["event"].tolist() == [10, 12, 13, 15]
    assert kept.truth["process_id"].tolist() == [0, 2, 3, 5]
    assert kept.truth["is_signal"].tolist() == [0, 0, 1, 1]
    assert np.isnan(kept["l1_score"]).all()
    assert last["event"].tolist() == [90, 91]
    stats = node.stats
    assert stats.events_in == 11 and stats.batches_in == 3
    assert stats.dropped == {"nonfinite": 5} and stats.accepted == 6 and stats.balanced
    assert _metric("dropped_total", "nonfinite", reason="nonfinite") == 5
    assert _metric("events_in_total", "nonfinite") == 11


def test_a_forged_event_count_moves_the_books_by_one_frame() -> None:
    ctx: zmq.SyncContext = zmq.Context.instance()
    node = relay_node("forged")
    forged = [
        # 60-odd bytes declaring 2**63 - 1 events, in this schema version and the next
        [msgpack.packb({"v": SCHEMA_VERSION, "kind": "events", "n": 2**63 - 1, "cols": []})],
        [msgpack.packb({"v": SCHEMA_VERSION + 1, "kind": "events", "n": 2**64 - 1})],
        # a real batch's buffers under a header that claims more rows than they hold
        _with_header(list(encode(synthetic_batch(4))), n=40_000),
        # a bool is not a schema version, whatever the buffers hold
        _with_header(list(encode(synthetic_batch(3))), v=True),
    ]
    with running(node):
        push = ctx.socket(zmq.PUSH)
        push.connect("inproc://forged-in")
        pull = ctx.socket(zmq.PULL)
        pull.connect("inproc://forged-out")
        for frames in forged:
            push.send_multipart(frames)
        push.send_multipart(encode(synthetic_batch(2, first_event=7)))
        received = recv_message(pull, timeout_ms=5000)
        assert recv_message(pull, timeout_ms=200) is None
        push.close(0)
        pull.close(0)
    assert isinstance(received, EventBatch) and received["event"].tolist() == [7, 8]
    stats = node.stats
    # One event per forged frame, except the v=True one, whose 3 events its buffers hold.
    assert stats.events_in == 1 + 1 + 1 + 3 + 2
    assert stats.dropped == {"decode_error": 6} and stats.accepted == 2 and stats.balanced
    assert _metric("events_in_total", "forged") == 8
    assert _metric("dropped_total", "forged", reason="decode_error") == 6


class Flaky(Processor):
    """Fails on every second batch."""

    def __init__(self) -> None:
        self.calls = 0

    def process(self, message: Message) -> Outcome:
        self.calls += 1
        if self.calls % 2 == 0:
            raise RuntimeError("boom")
        assert isinstance(message, EventBatch)
        return Outcome(rejected=len(message))


def test_a_worker_exception_drops_one_batch_only() -> None:
    ctx: zmq.SyncContext = zmq.Context.instance()
    config = NodeConfig(name="flaky", role="test", inputs=("@inproc://flaky-in",), drain_idle_s=0.2)
    node = Node(config, Flaky(), context=ctx)
    with running(node):
        push = ctx.socket(zmq.PUSH)
        push.connect("inproc://flaky-in")
        for i in range(4):
            send_message(push, synthetic_batch(3, first_event=3 * i))
        push.close(linger=1000)
        deadline = 200
        while node.stats.events_in < 12 and deadline:
            zmq.Poller().poll(20)
            deadline -= 1
    assert node.stats.rejected == 6
    assert node.stats.dropped == {"processing_error": 6}
    assert node.stats.balanced


def test_heartbeats_carry_state_and_counters() -> None:
    ctx: zmq.SyncContext = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.bind("inproc://control-hb")
    node = relay_node("beating", control=">inproc://control-hb")
    with running(node):
        frames = sub.recv_multipart() if sub.poll(5000) else None
    assert frames is not None
    beat = Heartbeat.from_frames(frames)
    assert beat.name == "beating" and beat.role == "relay"
    assert beat.state in {"running", "starting"}
    states = []
    while sub.poll(500):
        states.append(Heartbeat.from_frames(sub.recv_multipart()).state)
    assert states[-1] == "stopped"
    sub.close(0)


def test_records_pass_through_the_runtime() -> None:
    ctx: zmq.SyncContext = zmq.Context.instance()
    seen: list[Message] = []

    class Keep(Processor):
        def process(self, message: Message) -> Outcome:
            seen.append(message)
            return Outcome()

    config = NodeConfig(name="rec", role="test", inputs=("@inproc://rec-in",), drain_idle_s=0.2)
    node = Node(config, Keep(), context=ctx)
    with running(node):
        push = ctx.socket(zmq.PUSH)
        push.connect("inproc://rec-in")
        send_message(push, Record("flow_snapshot", {"events_seen": 7}, {"w": np.ones(3, "f4")}))
        push.close(linger=1000)
        for _ in range(100):
            if seen:
                break
            zmq.Poller().poll(20)
    assert node.stats.records_in == 1 and node.stats.events_in == 0
    assert isinstance(seen[0], Record) and seen[0].meta["events_seen"] == 7


def test_a_final_record_that_cannot_be_delivered_is_counted_as_lost() -> None:
    """A flow snapshot emitted at finish with nobody to take it is never lost silently."""

    class SnapshotAtEnd(ListSource):
        def finish(self) -> tuple[Emit, ...]:
            return (Emit("out", Record("flow_snapshot", {"events_seen": 8}, {})),)

    config = NodeConfig(
        name="lost-record",
        role="source",
        outputs={"out": "@inproc://lost-record-out"},
        drop_when_full=True,
    )
    stats = Node(config, SnapshotAtEnd([synthetic_batch(8)]), context=zmq.Context.instance()).run()
    assert stats.records_lost == {"out": 1} and stats.records_out == {}
    assert stats.to_dict()["records_lost"] == {"out": 1}
    lost = REGISTRY.get_sample_value(
        "records_lost_total", {"node": "lost-record", "role": "source", "port": "out"}
    )
    assert lost == 1


def test_a_source_with_no_room_downstream_counts_deadtime_drops() -> None:
    ctx: zmq.SyncContext = zmq.Context.instance()
    config = NodeConfig(
        name="deadtime",
        role="source",
        outputs={"out": "@inproc://deadtime-out"},
        drop_when_full=True,
    )
    batches = [synthetic_batch(8, first_event=8 * i) for i in range(5)]
    stats = Node(config, ListSource(batches), context=ctx).run()
    assert stats.events_in == 40
    assert stats.dropped == {"backpressure": 40}
    assert stats.accepted == 0 and stats.balanced


@pytest.mark.parametrize(
    ("make", "key"),
    [
        (lambda: Endpoint(url="http://host:1", bind=True), "url"),
        (lambda: SocketOptions(sndhwm=-1), "sndhwm"),
        (lambda: SocketOptions(linger_ms=-2), "linger_ms"),
        (lambda: NodeConfig(name="", role="relay"), "name"),
        (
            lambda: NodeConfig(name="n", role="relay", heartbeat_interval_s=0),
            "heartbeat_interval_s",
        ),
        (lambda: NodeConfig(name="n", role="relay", max_queue_batches=0), "max_queue_batches"),
        (lambda: NodeConfig(name="n", role="relay", inputs=("udp://h:1",)), "inputs.0"),
        (lambda: NodeConfig(name="n", role="relay", outputs={"out": "h:1"}), "outputs.out"),
        (lambda: NodeConfig(name="n", role="relay", metrics_port=70_000), "metrics_port"),
    ],
)
def test_bad_config_values_name_the_field(make: Callable[[], object], key: str) -> None:
    with pytest.raises(ValueError, match=rf"(?m)^{re.escape(key)}$"):
        make()
