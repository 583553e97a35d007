"""The runtime additions the farm relies on: waiting for downstream peers, timing figures
in the snapshot, and CURVE roles chosen by bind/connect."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from stream import EventBatch, Node, NodeConfig
from stream.codec import encode
from stream.testing import ListSource, Relay, synthetic_batch
from stream.transport import (
    CurveKeys,
    Endpoint,
    SocketOptions,
    free_tcp_port,
    open_socket,
    recv_message,
)


@pytest.mark.slow
def test_a_source_waits_for_all_its_peers_before_sending() -> None:
    ctx = zmq.Context()
    url = f"tcp://127.0.0.1:{free_tcp_port()}"
    batches = [synthetic_batch(10, first_event=10 * i) for i in range(6)]
    config = NodeConfig("src", "source", outputs={"out": f"@{url}"}, output_peers=2, peer_wait_s=20)
    node = Node(config, ListSource(batches), context=ctx)
    thread = threading.Thread(target=node.run)
    thread.start()
    try:
        first = open_socket(ctx, zmq.PULL, [Endpoint(url, bind=False)])
        time.sleep(0.5)
        assert not node.wait_started(0), "started with one of two peers"
        second = open_socket(ctx, zmq.PULL, [Endpoint(url, bind=False)])
        assert node.wait_started(10)
        counts = []
        for sock in (first, second):
            n = 0
            while (message := recv_message(sock, timeout_ms=1000)) is not None:
                assert isinstance(message, EventBatch)
                n += len(message)
            counts.append(n)
        assert counts == [30, 30]  # round robin over both from the first batch on
        thread.join(10)
        snapshot = node.snapshot()
        assert snapshot["cpu_s"] > 0 and snapshot["queue_depth"] == 0
        assert snapshot["last_in_s"] >= snapshot["first_in_s"] > 0
        assert snapshot["busy_s"] > 0
        for sock in (first, second):
            sock.close(linger=0)
    finally:
        node.request_stop()
        thread.join(10)
        ctx.term()


def test_curve_role_follows_bind_or_connect() -> None:
    ctx = zmq.Context()
    public, secret = zmq.curve_keypair()
    try:
        keys = SocketOptions(curve=CurveKeys(public, secret))
        url = f"tcp://127.0.0.1:{free_tcp_port()}"
        with pytest.raises(ValueError, match="server's public key"):
            open_socket(ctx, zmq.PULL, [Endpoint(url, bind=False)], keys)
        with pytest.raises(ValueError, match="only bind or only connect"):
            open_socket(ctx, zmq.PULL, [Endpoint(url, bind=True), Endpoint(url, bind=False)], keys)
        server = open_socket(ctx, zmq.PUSH, [Endpoint(url, bind=True)], keys)
        assert server.curve_server
        server.close(linger=0)
    finally:
        ctx.term()


def test_a_dead_output_costs_one_stall_not_one_per_batch() -> None:
    ctx = zmq.Context()
    config = NodeConfig(
        "relay",
        "relay",
        inputs=("@inproc://dead-in",),
        outputs={"out": "@inproc://dead-out"},  # nobody ever reads it
        heartbeat_interval_s=0.1,
        drain_idle_s=0.2,
        stall_after_s=0.5,
        socket=SocketOptions(sndhwm=1, rcvhwm=1, linger_ms=0),
    )
    node = Node(config, Relay(), context=ctx)
    thread = threading.Thread(target=node.run)
    thread.start()
    try:
        assert node.wait_started(10)
        push = ctx.socket(zmq.PUSH)
        push.connect("inproc://dead-in")
        for i in range(8):
            push.send_multipart(encode(synthetic_batch(10, first_event=10 * i)))
        time.sleep(0.3)
        t0 = time.monotonic()
        node.request_stop()
        thread.join(20)
        elapsed = time.monotonic() - t0
        assert not thread.is_alive()
        assert node.stats.events_in == 80 and node.stats.balanced
        assert node.stats.dropped["backpressure"] >= 60
        assert elapsed < 3.0, f"draining took {elapsed:.1f} s"  # 8 stalls would be >= 4 s
        push.close(linger=0)
    finally:
        node.request_stop()
        thread.join(10)
        ctx.term()
