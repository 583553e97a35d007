"""The real ``prometheus`` binary scrapes a running node; its HTTP API must see every event."""

from __future__ import annotations

import shutil
import time

import pytest
import zmq

from deploy.prometheus import PrometheusServer, ScrapeTarget, scrape_config
from stream import Node, NodeConfig
from stream.testing import Relay, synthetic_batch
from stream.transport import free_tcp_port, send_message
from tests.stream.conftest import running

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="the prometheus binary is missing (apt-get install -y prometheus)",
)


@pytest.mark.slow
def test_prometheus_scrapes_events_in_total() -> None:
    ctx: zmq.SyncContext = zmq.Context.instance()
    config = NodeConfig(
        name="prom-relay",
        role="relay",
        inputs=("@inproc://prom-in",),
        outputs={"out": "@inproc://prom-out"},
        metrics_port=0,
        drain_idle_s=0.2,
    )
    node = Node(config, Relay(), context=ctx)
    with running(node):
        push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        push.connect("inproc://prom-in")
        pull.connect("inproc://prom-out")
        sent = 0
        for i, size in enumerate((100, 250, 17)):
            send_message(push, synthetic_batch(size, first_event=1000 * i))
            sent += size
        for _ in range(3):
            assert pull.poll(5000)
            pull.recv_multipart()
        assert node.metrics_port is not None
        target = ScrapeTarget("trigfarm", f"127.0.0.1:{node.metrics_port}")
        with PrometheusServer(
            scrape_config([target], interval_s=0.5), port=free_tcp_port()
        ) as prom:
            query = 'events_in_total{node="prom-relay"}'
            value = None
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and value != sent:
                value = prom.query_value(query)
                time.sleep(0.3)
            assert value == sent
            up = prom.query_value('up{job="trigfarm"}')
            assert up == 1.0
        push.close(0)
        pull.close(0)
