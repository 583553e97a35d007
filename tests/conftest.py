"""Shared fixtures: where the real public data lives (skipping cleanly without it), and the
source -> node -> sink chain of the node tests."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypedDict

import pytest
import zmq

from stream.node import Node, NodeConfig, Processor, Producer
from stream.testing import RecordingSink
from stream.transport import free_tcp_port


class SmallFlow(TypedDict):
    """The size of a flow small enough to train in a test (``OnlineConfig`` keywords)."""

    n_transforms: int
    hidden_features: int
    n_bins: int
    n_blocks: int
    n_members: int


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """A path under ``../shared/data``; skips the test with a clear message if it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data {path} is not here (see ../shared/data/README.md)")
    return path


class Chain:
    """A source node, an optional middle node and a recording sink, wired over loopback TCP
    and each run in its own thread: the chain that the node tests share.

    Started downstream first (sink, middle, then the source), and stopped in the same
    order as a farm drains: the source finishes by itself, then the middle node, then
    the sink, so every event sent is counted by the node that received it.
    """

    def __init__(
        self,
        source: Producer,
        middle: Processor | None = None,
        *,
        names: tuple[str, str, str] = ("source", "node", "sink"),
        middle_role: str = "node",
        middle_output: str = "out",
        source_options: Mapping[str, Any] | None = None,
        middle_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.ctx: zmq.SyncContext = zmq.Context()
        into_middle, into_sink = free_tcp_port(), free_tcp_port()
        first_hop = into_middle if middle is not None else into_sink
        self.source = Node(
            NodeConfig(
                names[0],
                "source",
                outputs={"out": f"@tcp://127.0.0.1:{first_hop}"},
                **(source_options or {}),
            ),
            source,
            context=self.ctx,
        )
        self.middle = None
        if middle is not None:
            config = NodeConfig(
                names[1],
                middle_role,
                inputs=(f">tcp://127.0.0.1:{into_middle}",),
                outputs={middle_output: f"@tcp://127.0.0.1:{into_sink}"},
                **(middle_options or {}),
            )
            self.middle = Node(config, middle, context=self.ctx)
        self.sink = RecordingSink()
        self.sink_node = Node(
            NodeConfig(
                names[2], "sink", inputs=(f">tcp://127.0.0.1:{into_sink}",), drain_idle_s=0.5
            ),
            self.sink,
            context=self.ctx,
        )
        self._threads: dict[str, threading.Thread] = {}
        for node in (self.sink_node, self.middle, self.source):
            if node is not None:
                thread = threading.Thread(target=node.run, daemon=True)
                self._threads[node.config.name] = thread
                thread.start()
                assert node.wait_started(10), f"{node.config.name} did not start"
        self._stopped = False

    @property
    def source_running(self) -> bool:
        return self._threads[self.source.config.name].is_alive()

    def wait_for_source(self, timeout_s: float = 60.0) -> None:
        """Until the source has sent its last batch and stopped."""
        self._threads[self.source.config.name].join(timeout_s)
        assert not self.source_running, "the source did not finish"

    def wait_for_events(self, node: Node, n_events: int, timeout_s: float = 60.0) -> None:
        """Until ``node`` has received ``n_events`` (event-driven: polls its counters)."""
        deadline = time.monotonic() + timeout_s
        while node.stats.events_in < n_events and time.monotonic() < deadline:
            time.sleep(0.02)
        assert node.stats.events_in >= n_events, (node.config.name, node.stats.events_in)

    @staticmethod
    def scrape(node: Node) -> str:
        """The node's Prometheus exposition, read over HTTP as Prometheus would."""
        url = f"http://127.0.0.1:{node.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text: str = reply.read().decode()
        return text

    def stop(self) -> None:
        """Drain in chain order (source, middle, sink) and close the context; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        for node in (self.source, self.middle, self.sink_node):
            if node is not None:
                node.request_stop()
                self._threads[node.config.name].join(30)
        self.ctx.term()


@pytest.fixture
def chain() -> Iterator[Callable[..., Chain]]:
    """Start ``Chain``s; every one is stopped when the test ends, passed or failed."""
    started: list[Chain] = []

    def start(*args: Any, **kwargs: Any) -> Chain:
        started.append(Chain(*args, **kwargs))
        return started[-1]

    yield start
    for running in started:
        running.stop()
